"""extract: data/raw/<dataset>/ -> data/extracted/<dataset>/

usage: python -m stages.extract RAW_DIR OUT_DIR

The files are untrusted. A CIFAR tarball: every member is checked against the data set's
manifest (regular files only, no links or devices, no absolute or `..` paths, no duplicates)
before anything is written, then each is copied out by hand, never with extractall. IDX .gz
files (MNIST-style): each is inflated by streaming, and refused as soon as it yields more bytes
than its own IDX header declares, so a gzip bomb fills neither memory nor disk. Everything goes
into a temporary directory that is renamed into place.
"""
from __future__ import annotations

import gzip
import math
import sys
import tarfile
import zlib
from pathlib import Path

from stages.datasets import DATASETS, Dataset, read_idx_header
from stages.outputs import StageError, atomic_dir, stage_main
from stages.params import load_params

MAX_MEMBER_BYTES = 400 << 20  # CIFAR-100's train is 155 MB; refuse anything absurd before reading
CHUNK = 1 << 20


def check_members(members: list[tarfile.TarInfo], tarball: Path,
                  dataset: Dataset) -> dict[str, tarfile.TarInfo]:
    """Map file name -> member after checking the listing; raise StageError naming the member."""
    base, required = dataset.folder, frozenset(dataset.members)
    allowed = required | frozenset(dataset.optional)
    files: dict[str, tarfile.TarInfo] = {}
    for member in members:
        name = member.name
        if member.isdir() and name.rstrip("/") == base:
            continue
        where = f"{tarball}: member {name!r}"
        if not member.isfile():
            raise StageError(f"{where} is a {_kind(member)}; only regular files are expected. "
                             f"The archive is not {dataset.name}'s python version: delete it and "
                             "run `dvc repro download`")
        parts = name.split("/")
        if name.startswith("/") or ".." in parts or len(parts) != 2 or parts[0] != base:
            raise StageError(f"{where} is outside {base}/; expected {base}/<file>")
        if parts[1] not in allowed:
            raise StageError(f"{where} is unexpected; expected only {sorted(allowed)}")
        if parts[1] in files:
            raise StageError(f"{where} appears twice")
        if member.size > MAX_MEMBER_BYTES:
            raise StageError(f"{where} declares {member.size} bytes, more than {MAX_MEMBER_BYTES}")
        files[parts[1]] = member
    missing = sorted(required - set(files))
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


def extract_tarball(tarball: Path, out: Path, dataset: Dataset) -> None:
    """The checked members of a CIFAR tarball into `out`."""
    try:
        check_gzip(tarball)
        with tarfile.open(tarball, "r:gz") as archive:
            files = check_members(archive.getmembers(), tarball, dataset)
            for name, member in sorted(files.items()):
                copy_member(archive, member, out / name)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise StageError(f"{tarball}: not a readable .tar.gz ({type(err).__name__}: {err}); "
                         "it is truncated or corrupt: delete it and run `dvc repro download`") from None


def inflate_idx(source: Path, dest: Path) -> None:
    """Inflate one IDX .gz, never past the size its header declares."""
    try:
        with gzip.open(source, "rb") as stream, open(dest, "xb") as out:
            dims, header = read_idx_header(stream, source)
            out.write(header)
            left = math.prod(dims)
            while left > 0 and (block := stream.read(min(CHUNK, left))):
                out.write(block)
                left -= len(block)
            if left:
                raise StageError(f"{source}: ends {left} bytes short of the {dims} its header "
                                 "declares; delete it and run `dvc repro download`")
            if stream.read(1):
                raise StageError(f"{source}: inflates past the {len(header) + math.prod(dims)} "
                                 f"bytes its header declares ({dims}); refused before reading more")
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise StageError(f"{source}: not a readable .gz ({type(err).__name__}: {err}); it is "
                         "truncated or corrupt: delete it and run `dvc repro download`") from None


def extract(raw: Path, out: Path, dataset: Dataset) -> None:
    """The data set's files in `raw` into `out`, atomically."""
    missing = [name for name in dataset.md5 if not (raw / name).is_file()]
    if missing:
        raise StageError(f"{raw}: missing {missing} of {dataset.name}; run `dvc repro download` first")
    with atomic_dir(out) as tmp:
        if dataset.format == "cifar":
            extract_tarball(raw / next(iter(dataset.md5)), tmp, dataset)
        else:
            for name in dataset.md5:
                inflate_idx(raw / name, tmp / name.removesuffix(".gz"))
    print(f"extract: {dataset.name} into {out}")


@stage_main
def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    dataset = DATASETS[load_params().download.dataset]
    extract(Path(sys.argv[1]), Path(sys.argv[2]), dataset)


if __name__ == "__main__":
    main()
