import functools
import http.server
import threading
from pathlib import Path

import pytest

from stages.download import download
from stages.lib.outputs import StageError
from stages.lib.params import DownloadParams

TARBALL = "cifar-10-python.tar.gz"  # the name download gives CIFAR-10's file


def params(url: str, md5: str, retries: int = 0) -> DownloadParams:
    return DownloadParams(dataset="cifar10", url=url, md5=md5, timeout=5.0, retries=retries)


def test_download_copies_a_file_url_and_checks_md5(tarball, tmp_path: Path) -> None:
    path, md5 = tarball
    out = tmp_path / "raw" / "cifar-10-python.tar.gz"
    download(params(path.as_uri(), md5), out)
    assert (out / TARBALL).read_bytes() == path.read_bytes()
    assert not list(out.parent.glob("*.part"))


def test_download_accepts_a_plain_local_path(tarball, tmp_path: Path) -> None:
    path, md5 = tarball
    out = tmp_path / "out.tar.gz"
    download(params(str(path), md5), out)
    assert (out / TARBALL).read_bytes() == path.read_bytes()


def test_download_refuses_a_wrong_md5_and_leaves_no_file(tarball, tmp_path: Path) -> None:
    path, _ = tarball
    out = tmp_path / "out.tar.gz"
    with pytest.raises(StageError, match="does not match download.md5"):
        download(params(path.as_uri(), "0" * 32), out)
    assert list(tmp_path.iterdir()) == []


def test_download_names_a_missing_local_source(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="is not a file; if this machine is offline"):
        download(params(str(tmp_path / "nope.tar.gz"), "0" * 32), tmp_path / "out.tar.gz")
    assert not (tmp_path / "out.tar.gz").exists()


class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def http_root(tmp_path: Path):
    """Serve a directory on 127.0.0.1 from a thread; yields (root dir, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_over_http(tarball, http_root, tmp_path: Path) -> None:
    path, md5 = tarball
    root, base = http_root
    (root / "c.tar.gz").write_bytes(path.read_bytes())
    out = tmp_path / "out.tar.gz"
    download(params(f"{base}/c.tar.gz", md5), out)
    assert (out / TARBALL).read_bytes() == path.read_bytes()


def test_download_http_404_is_a_clear_error(http_root, tmp_path: Path) -> None:
    _, base = http_root
    with pytest.raises(StageError, match="HTTP 404"):
        download(params(f"{base}/missing.tar.gz", "0" * 32), tmp_path / "out.tar.gz")
    assert not (tmp_path / "out.tar.gz").exists()


def test_download_refuses_an_html_page(http_root, tmp_path: Path) -> None:
    root, base = http_root
    (root / "index.html").write_text("<html>please log in</html>")
    with pytest.raises(StageError, match="HTML page"):
        download(params(f"{base}/index.html", "0" * 32), tmp_path / "out.tar.gz")


def test_download_unreachable_host_says_how_to_work_offline(tmp_path: Path) -> None:
    # Port 9 on loopback: nothing listens, the connection is refused at once.
    with pytest.raises(StageError, match="cannot connect.*point download.url at them"):
        download(params("http://127.0.0.1:9/c.tar.gz", "0" * 32), tmp_path / "out.tar.gz")
    assert not (tmp_path / "out.tar.gz").exists()
