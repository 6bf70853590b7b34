"""Atomic outputs: everything is written to a temporary sibling and renamed on success only.

A failed stage then leaves nothing that DVC or the next stage could take for a result.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# Write failures that the user fixes on the machine, not in the code.
STORAGE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file size limit was hit",
                  errno.EDQUOT: "the disk quota is exceeded"}


class StageError(Exception):
    """An expected failure (bad input, bad params, full disk): one message, exit status 1."""


@contextlib.contextmanager
def storage_errors(dest: Path) -> Iterator[None]:
    """Turn a full disk (or file-size limit) while writing `dest` into a StageError."""
    try:
        yield
    except OSError as err:
        if err.errno not in STORAGE_ERRORS:
            raise
        raise StageError(f"{dest}: cannot write it, {STORAGE_ERRORS[err.errno]} ({err.strerror}); "
                         "free space and rerun: nothing partial was kept") from None


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `dest`; on success it replaces `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        with storage_errors(dest):
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
        with storage_errors(dest):
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


def stage_main(main: Callable[[], None]) -> Callable[[], None]:
    """Wrap a stage's main(): an expected failure prints one `error:` line and exits 1."""

    @functools.wraps(main)
    def wrapper() -> None:
        try:
            main()
        except StageError as err:
            raise SystemExit(f"error: {err}") from None

    return wrapper
