"""Atomic outputs: everything is written to a temporary sibling and renamed on success only.

A failed stage then leaves nothing that DVC or the next stage could take for a result.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `dest`; on success it replaces `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it is fsynced and renamed to `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(dest: Path, data: object) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_file(dest) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


class StageError(Exception):
    """An expected failure (bad input, bad params): printed as one message, exit status 1."""


def stage_main(main: Callable[[], None]) -> Callable[[], None]:
    """Wrap a stage's main(): an expected failure prints one `error:` line and exits 1."""

    @functools.wraps(main)
    def wrapper() -> None:
        try:
            main()
        except StageError as err:
            raise SystemExit(f"error: {err}") from None

    return wrapper
