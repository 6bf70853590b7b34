"""extract: data/raw/cifar-10-python.tar.gz -> data/extracted/cifar-10-batches-py/

usage: python -m stages.extract TARBALL OUT_DIR

The archive is untrusted: every member is checked against the expected manifest (regular
files only, no links or devices, no absolute or `..` paths, no duplicates) before anything is
written, then each is copied out by hand, never with extractall, into a temporary directory
that is renamed into place.
"""
from __future__ import annotations

import gzip
import sys
import tarfile
import zlib
from pathlib import Path

from stages.outputs import StageError, atomic_dir, stage_main

BASE_FOLDER = "cifar-10-batches-py"
REQUIRED = frozenset([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"])
OPTIONAL = frozenset(["readme.html"])
MAX_MEMBER_BYTES = 200 << 20  # a real batch is 31 MB; refuse anything absurd before reading it
CHUNK = 1 << 20


def check_members(members: list[tarfile.TarInfo], tarball: Path) -> dict[str, tarfile.TarInfo]:
    """Map file name -> member after checking the listing; raise StageError naming the member."""
    files: dict[str, tarfile.TarInfo] = {}
    for member in members:
        name = member.name
        if member.isdir() and name.rstrip("/") == BASE_FOLDER:
            continue
        where = f"{tarball}: member {name!r}"
        if not member.isfile():
            raise StageError(f"{where} is a {_kind(member)}; only regular files are expected. "
                             "The archive is not the CIFAR-10 python version: delete it and "
                             "run `dvc repro download`")
        parts = name.split("/")
        if name.startswith("/") or ".." in parts or len(parts) != 2 or parts[0] != BASE_FOLDER:
            raise StageError(f"{where} is outside {BASE_FOLDER}/; expected {BASE_FOLDER}/<file>")
        if parts[1] not in REQUIRED | OPTIONAL:
            raise StageError(f"{where} is unexpected; expected only {sorted(REQUIRED | OPTIONAL)}")
        if parts[1] in files:
            raise StageError(f"{where} appears twice")
        if member.size > MAX_MEMBER_BYTES:
            raise StageError(f"{where} declares {member.size} bytes, more than {MAX_MEMBER_BYTES}")
        files[parts[1]] = member
    missing = sorted(REQUIRED - set(files))
    if missing:
        raise StageError(f"{tarball}: missing member(s) {missing}; delete the archive and run "
                         "`dvc repro download`")
    return files


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym() or member.islnk():
        return f"link to {member.linkname!r}"
    if member.isdev():
        return "device"
    return "directory" if member.isdir() else "special file"


def copy_member(archive: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    """Copy one regular member's bytes; the byte count must equal the header's size."""
    source = archive.extractfile(member)
    assert source is not None  # check_members admitted regular files only
    written = 0
    with source, open(dest, "xb") as out:
        while block := source.read(CHUNK):
            written += len(block)
            if written > member.size:
                break
            out.write(block)
    if written != member.size:
        raise StageError(f"member {member.name!r}: read {written} bytes, header says {member.size}")


def check_gzip(tarball: Path) -> None:
    """Decompress the whole stream once: its CRC and length show truncation or corruption that
    tarfile alone may take for the end of the archive."""
    with gzip.open(tarball, "rb") as stream:
        while stream.read(CHUNK):
            pass


def extract(tarball: Path, out: Path) -> None:
    """Extract the checked members of `tarball` into `out`, atomically."""
    if not tarball.is_file():
        raise StageError(f"{tarball}: not found; run `dvc repro download` first")
    try:
        check_gzip(tarball)
        with tarfile.open(tarball, "r:gz") as archive:
            files = check_members(archive.getmembers(), tarball)
            with atomic_dir(out) as tmp:
                for name, member in sorted(files.items()):
                    copy_member(archive, member, tmp / name)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise StageError(f"{tarball}: not a readable .tar.gz ({type(err).__name__}: {err}); "
                         "it is truncated or corrupt: delete it and run `dvc repro download`") from None


@stage_main
def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    extract(Path(sys.argv[1]), Path(sys.argv[2]))


if __name__ == "__main__":
    main()
