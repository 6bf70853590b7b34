"""extract: data/raw/<dataset>/ -> data/extracted/<dataset>/

usage: python -m stages.extract RAW_DIR OUT_DIR

The files are untrusted. A CIFAR tarball: every member is checked against the data set's
manifest (regular files only, no links or devices, no absolute or `..` paths, no duplicates)
before anything is written, then each is copied out by hand, never with extractall. IDX .gz
files (MNIST-style): each is inflated by streaming, and refused as soon as it yields more bytes
than its own IDX header declares, so a gzip bomb fills neither memory nor disk. Everything goes
into a temporary directory that is renamed into place.

A person's folder (`download.dataset: folder`): a copied folder is linked (or copied) file by
file; an archive (.tar, .tar.gz, .tgz, .zip) is checked member by member as above, any
layout inside, before anything is written: regular files and folders only, no absolute or `..`
paths, no duplicates, no member declaring more than MAX_MEMBER_BYTES.
"""
from __future__ import annotations

from stages.lib.params import preflight

preflight(__name__, __doc__)  # --help, and bad params.yaml, answered before the slow imports

import gzip
import math
import os
import shutil
import stat
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

from stages.lib.datasets import DATASETS, Dataset, read_idx_header
from stages.lib.outputs import StageError, atomic_dir, stage_main
from stages.lib.params import load_params

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
                copy_stream(archive.extractfile(member), out / name, member.size,
                            f"{tarball}: member {member.name!r}")
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


def member_path(name: str, archive: Path) -> str:
    """A member's path, refused if absolute or climbing out with `..`."""
    parts = name.replace("\\", "/").rstrip("/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or (parts[0].endswith(":")):
        raise StageError(f"{archive}: member {name!r} points outside the folder (an absolute or "
                         "`..` path); refused before anything was written")
    return "/".join(p for p in parts if p not in ("", "."))


def tar_listing(archive: tarfile.TarFile, path: Path) -> list[tuple[str, tarfile.TarInfo]]:
    """(path, member) of each regular file; links, devices and other specials refused."""
    files = []
    for member in archive.getmembers():
        name = member_path(member.name, path)
        if member.isdir():
            continue
        if not member.isfile():
            raise StageError(f"{path}: member {member.name!r} is a {_kind(member)}; only regular "
                             "files and folders are extracted")
        files.append((name, member))
    return files


def zip_listing(archive: zipfile.ZipFile, path: Path) -> list[tuple[str, zipfile.ZipInfo]]:
    files = []
    for member in archive.infolist():
        name = member_path(member.filename, path)
        mode = member.external_attr >> 16
        if member.is_dir():
            continue
        if mode and not stat.S_ISREG(mode):
            raise StageError(f"{path}: member {member.filename!r} is a link or special file; only "
                             "regular files and folders are extracted")
        files.append((name, member))
    return files


def check_listing(names: list[str], sizes: list[int], archive: Path) -> None:
    seen: set[str] = set()
    for name, size in zip(names, sizes):
        if name in seen or not name:
            raise StageError(f"{archive}: member {name!r} appears twice")
        seen.add(name)
        if size > MAX_MEMBER_BYTES:
            raise StageError(f"{archive}: member {name!r} declares {size} bytes, more than "
                             f"{MAX_MEMBER_BYTES}; not an image file")
    if not names:
        raise StageError(f"{archive}: holds no files")


def copy_stream(source: object, dest: Path, size: int, where: str) -> None:
    """Copy an archive member's bytes (a tar's or a zip's), never past its declared size; the
    byte count must equal it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with source, open(dest, "xb") as out:  # type: ignore[attr-defined]
        while block := source.read(CHUNK):  # type: ignore[attr-defined]
            written += len(block)
            if written > size:
                break
            out.write(block)
    if written != size:
        raise StageError(f"{where}: read {written} bytes, its header says {size}; the archive is "
                         "corrupt: fix it and run `dvc repro download`")


def extract_archive(path: Path, out: Path) -> int:
    """A person's .tar(.gz) or .zip into `out`, every member checked before any is written."""
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                files = zip_listing(archive, path)
                check_listing([n for n, _ in files], [m.file_size for _, m in files], path)
                for name, member in files:
                    copy_stream(archive.open(member), out / name, member.file_size, f"{path}: {name}")
            return len(files)
        if path.name.lower().endswith((".gz", ".tgz")):
            check_gzip(path)
        with tarfile.open(path, "r:*") as archive:
            members = tar_listing(archive, path)
            check_listing([n for n, _ in members], [m.size for _, m in members], path)
            for name, member in members:
                copy_stream(archive.extractfile(member), out / name, member.size, f"{path}: {name}")
        return len(members)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise StageError(f"{path}: not a readable archive ({type(err).__name__}: {err}); it is "
                         "truncated or corrupt: fix it and run `dvc repro download`") from None


def link_tree(source: Path, out: Path) -> int:
    """A copied folder into `out`: hard links where the file system allows, else copies."""
    count = 0
    for folder, _, files in os.walk(source):
        target = out / Path(folder).relative_to(source)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                os.link(Path(folder) / name, target / name)
            except OSError:
                shutil.copyfile(Path(folder) / name, target / name)
            count += 1
    return count


def extract_folder(raw: Path, out: Path) -> None:
    """download's copy of a person's folder, or the one archive it fetched, into `out`."""
    entries = sorted(raw.iterdir()) if raw.is_dir() else []
    if len(entries) != 1:
        raise StageError(f"{raw}: expected the one folder or archive download writes, found "
                         f"{[e.name for e in entries]}; run `dvc repro download`")
    with atomic_dir(out) as tmp:
        source = entries[0]
        count = link_tree(source, tmp) if source.is_dir() else extract_archive(source, tmp)
    print(f"extract: folder, {count} file(s) from {source} into {out}")


def extract(raw: Path, out: Path, dataset: Dataset) -> None:
    """The data set's files in `raw` into `out`, atomically."""
    if dataset.format == "folder":
        extract_folder(raw, out)
        return
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
