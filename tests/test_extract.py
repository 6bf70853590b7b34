import io
import tarfile
from pathlib import Path

import pytest

from stages.extract import extract
from stages.lib.datasets import DATASETS
from stages.lib.outputs import StageError
from tests.cifar_format import batch_members, write_tarball

CIFAR10 = DATASETS["cifar10"]


def raw_archive(tmp_path: Path) -> Path:
    """Where download puts CIFAR-10's tarball: data/raw/cifar10/cifar-10-python.tar.gz."""
    raw = tmp_path / "raw"
    raw.mkdir(exist_ok=True)
    return raw / "cifar-10-python.tar.gz"


def test_extract_writes_exactly_the_manifest(tarball, tmp_path: Path) -> None:
    out = tmp_path / "extracted" / "cifar-10-batches-py"
    extract(tarball[0].parent, out, CIFAR10)
    assert {p.name for p in out.iterdir()} == set(CIFAR10.members) | {"readme.html"}
    assert [p.name for p in out.parent.iterdir()] == ["cifar-10-batches-py"]  # no temp dir left


def add_member(path: Path, info: tarfile.TarInfo, payload: bytes = b"") -> None:
    """Rewrite a valid archive with one more member."""
    members = batch_members()
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            member = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        info.size = len(payload) if info.isfile() else 0
        tar.addfile(info, io.BytesIO(payload) if info.isfile() else None)


def link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.mark.parametrize("info, message", [
    (tarfile.TarInfo("cifar-10-batches-py/evil.py"), "is unexpected"),
    (tarfile.TarInfo("cifar-10-batches-py/../evil"), "is outside"),
    (tarfile.TarInfo("/etc/evil"), "is outside"),
    (link("cifar-10-batches-py/x", "/etc/passwd", tarfile.SYMTYPE), "is a link"),
    (link("cifar-10-batches-py/y", "cifar-10-batches-py/test_batch", tarfile.LNKTYPE), "is a link"),
    (link("cifar-10-batches-py/dev", "", tarfile.CHRTYPE), "is a device"),
    (tarfile.TarInfo("cifar-10-batches-py/test_batch"), "appears twice"),
])
def test_extract_refuses_unexpected_members_before_writing(tmp_path: Path, info, message) -> None:
    archive = raw_archive(tmp_path)
    add_member(archive, info, b"payload")
    out = tmp_path / "out" / "cifar-10-batches-py"
    with pytest.raises(StageError, match=message):
        extract(archive.parent, out, CIFAR10)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_extract_refuses_a_missing_member(tmp_path: Path) -> None:
    members = batch_members()
    del members["data_batch_3"]
    archive = raw_archive(tmp_path)
    write_tarball(archive, members)
    with pytest.raises(StageError, match=r"missing member\(s\) \['data_batch_3'\]"):
        extract(archive.parent, tmp_path / "out", CIFAR10)
    assert not (tmp_path / "out").exists()


def test_extract_refuses_a_truncated_archive(tarball, tmp_path: Path) -> None:
    archive = raw_archive(tmp_path)
    data = tarball[0].read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(StageError, match="truncated or corrupt"):
        extract(archive.parent, tmp_path / "out", CIFAR10)
    assert not (tmp_path / "out").exists()


def test_extract_refuses_a_file_that_is_not_gzip(tmp_path: Path) -> None:
    archive = raw_archive(tmp_path)
    archive.write_text("<html>not an archive</html>")
    with pytest.raises(StageError, match="not a readable .tar.gz"):
        extract(archive.parent, tmp_path / "out", CIFAR10)


def test_extract_replaces_a_previous_output(tarball, tmp_path: Path) -> None:
    out = tmp_path / "cifar-10-batches-py"
    out.mkdir()
    (out / "stale").write_text("old")
    extract(tarball[0].parent, out, CIFAR10)
    assert not (out / "stale").exists()
