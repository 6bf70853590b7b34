"""Atomic outputs: everything is written to a temporary sibling and renamed on success only.

A failed stage then leaves nothing that DVC or the next stage could take for a result.
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import glob
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


# params.yaml's path and bytes as a stage read them at its start (stage_main sets them): every
# output is checked against them before it is renamed into place
PARAMS_READ: contextvars.ContextVar[tuple[Path, bytes] | None] = contextvars.ContextVar(
    "PARAMS_READ", default=None)
# Where `dvc exp run` (in the workspace: not --temp or --queue) keeps its record of the
# experiment it runs. DVC runs one experiment per workspace: a second `dvc exp run` started
# beside it takes its queued params, and deletes this record when it fails, so DVC can record
# neither; this run then stops at once with one message instead of failing in DVC at the end.
# A DVC version that moved it fails the end-to-end tests' `dvc exp run`, not silently.
EXPERIMENT_RECORD = Path(".dvc/tmp/exps/run/workspace/workspace.run")
SIDE_BY_SIDE = ("Run experiments side by side with `dvc exp run --temp`, or `dvc exp run --queue` "
                "and `dvc queue start`")


def check_run_intact() -> None:
    """Stop, before an output lands, if the run it belongs to changed under the stage: the
    result would be recorded under params it was not made with (params.yaml rewritten since
    the stage started), or could not be recorded at all (check_experiment_record)."""
    read = PARAMS_READ.get()
    if read is None:  # not inside a stage's main (stage_main)
        return
    path, content = read
    try:
        now = path.read_bytes()
    except OSError:
        now = None
    if now != content:
        raise StageError(f"{path} changed while this stage ran: another `dvc exp run` in this "
                         f"workspace? Nothing was written. {SIDE_BY_SIDE}")
    check_experiment_record()


def check_experiment_record() -> None:
    """Stop if this stage runs in a workspace experiment whose DVC record is gone or names
    another experiment (DVC's environment names it: DVC_EXP_NAME, DVC_ROOT)."""
    name, root = os.environ.get("DVC_EXP_NAME"), os.environ.get("DVC_ROOT")
    if not name or not root or Path(root).resolve() != Path.cwd().resolve():
        return  # not an experiment, or one in a copy of its own (--temp, --queue)
    record = Path(root) / EXPERIMENT_RECORD
    try:
        recorded = json.loads(record.read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded != name:
        raise StageError(f"another `dvc exp run` started in this workspace while experiment "
                         f"{name} ran ({record}, DVC's record of it, is gone or names another): "
                         f"DVC runs one experiment per workspace and can record neither. Nothing "
                         f"was written. {SIDE_BY_SIDE}")


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


def scratch_prefix(dest: Path) -> str:
    """The name start of `dest`'s temporary siblings: `.NAME.PID.`, so that a later run can
    tell a killed run's scratch from a running one's."""
    return f".{dest.name}.{os.getpid()}."


def sweep_scratch(dest: Path) -> None:
    """Remove the temporary siblings of `dest` that a killed run left (`.NAME.PID.*.tmp` whose
    process is gone), and only those: a running process's scratch stays."""
    for path in dest.parent.glob(f".{glob.escape(dest.name)}.*.tmp"):
        pid = path.name[len(dest.name) + 2:].split(".")[0]
        if pid.isdigit() and process_alive(int(pid)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (another user's process too: signal 0 is then refused, not unknown)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `dest`; on success it replaces `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_scratch(dest)
    tmp = Path(tempfile.mkdtemp(prefix=scratch_prefix(dest), suffix=".tmp", dir=dest.parent))
    try:
        with storage_errors(dest):
            yield tmp
        check_run_intact()
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
    sweep_scratch(dest)
    fd, name = tempfile.mkstemp(prefix=scratch_prefix(dest), suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with storage_errors(dest):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        check_run_intact()
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(dest: Path, data: object) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_file(dest) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def stage_main(main: Callable[[], None]) -> Callable[[], None]:
    """Wrap a stage's main(): an expected failure prints one `error:` line and exits 1.
    (`--help` is answered before: by params.preflight, or predict's argparse.)"""

    @functools.wraps(main)
    def wrapper() -> None:
        params = Path("params.yaml").resolve()
        token = PARAMS_READ.set((params, params.read_bytes()) if params.is_file() else None)
        try:
            check_experiment_record()
            main()
        except StageError as err:
            raise SystemExit(f"error: {err}") from None
        finally:
            PARAMS_READ.reset(token)

    return wrapper
