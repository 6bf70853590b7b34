"""Download faults, served by a misbehaving HTTP server on 127.0.0.1 started by the test."""
from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

import pytest

import stages.download
from stages.download import download
from stages.lib.outputs import StageError
from stages.lib.params import DownloadParams

TARBALL = "cifar-10-python.tar.gz"  # the name download gives CIFAR-10's file


class Faulty(http.server.BaseHTTPRequestHandler):
    """Serves `payload` under paths that each misbehave in their own way."""

    payload = b""
    calls: dict[str, int] = {}

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        route = self.path.strip("/")
        Faulty.calls[route] = Faulty.calls.get(route, 0) + 1
        data, start = Faulty.payload, 0
        if route == "slow":
            time.sleep(1.0)  # longer than the client's read timeout
        if route == "flaky" and Faulty.calls[route] <= 2:
            return self.send_error(503, "busy")
        ranged = self.headers.get("Range")
        if route == "drop" and ranged:  # honours Range: resume works
            start = int(ranged.split("=")[1].rstrip("-"))
            self.send_response(206)
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if route == "truncated" or (route == "drop" and not ranged):
            body = body[: len(body) // 2]  # the connection breaks half-way
        self.wfile.write(body)
        self.wfile.flush()


@pytest.fixture
def server(tarball, monkeypatch):
    monkeypatch.setattr(stages.download, "BACKOFF_SECONDS", 0.0)
    Faulty.payload = tarball[0].read_bytes()
    Faulty.calls = {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Faulty)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def params(url: str, md5: str, retries: int = 2, timeout: float = 5.0) -> DownloadParams:
    return DownloadParams(dataset="cifar10", url=url, md5=md5, timeout=timeout, retries=retries)


def test_connection_dropped_half_way_resumes_with_range(server, tarball, tmp_path: Path) -> None:
    out = tmp_path / "a.tar.gz"
    download(params(f"{server}/drop", tarball[1]), out)
    assert (out / TARBALL).read_bytes() == tarball[0].read_bytes()
    assert Faulty.calls["drop"] == 2  # one broken transfer, one resumed


def test_truncated_transfers_give_up_after_the_retries(server, tarball, tmp_path: Path) -> None:
    out = tmp_path / "a.tar.gz"
    with pytest.raises(StageError, match=r"truncated: transfer ended after \d+ of \d+ bytes \(gave up after 3 attempts\)"):
        download(params(f"{server}/truncated", tarball[1]), out)
    assert not out.exists()
    assert Faulty.calls["truncated"] == 3


def test_server_errors_are_retried(server, tarball, tmp_path: Path) -> None:
    out = tmp_path / "a.tar.gz"
    download(params(f"{server}/flaky", tarball[1]), out)
    assert (out / TARBALL).read_bytes() == tarball[0].read_bytes()
    assert Faulty.calls["flaky"] == 3


def test_read_timeout_is_named(server, tarball, tmp_path: Path) -> None:
    out = tmp_path / "a.tar.gz"
    with pytest.raises(StageError, match=rf"{server}/slow: .*timed out.*gave up after 2 attempts"):
        download(params(f"{server}/slow", tarball[1], retries=1, timeout=0.3), out)
    assert not out.exists()


def test_wrong_checksum_after_http_leaves_no_output(server, tmp_path: Path) -> None:
    out = tmp_path / "a.tar.gz"
    with pytest.raises(StageError, match="md5 .* does not match download.md5"):
        download(params(f"{server}/plain", "f" * 32), out)
    assert list(tmp_path.iterdir()) == []
