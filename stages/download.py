"""download: params download.url/md5 -> data/raw/cifar-10-python.tar.gz (md5-verified).

usage: python -m stages.download OUT_TARBALL

HTTP(S) downloads stream to OUT.part with timeouts, bounded retries with back-off and
Range resume; a file:// URL or a plain local path (an offline mirror) is copied the same way.
The md5 is checked before the .part file is renamed into place.
"""
from __future__ import annotations

import hashlib
import http.client
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from stages.outputs import StageError, stage_main, storage_errors
from stages.params import DownloadParams, load_params

CHUNK = 1 << 20
BACKOFF_SECONDS = 1.0  # first wait between attempts; doubles each time, at most 30 s
OFFLINE_HINT = ("if this machine is offline, build or copy the archive locally and point "
                "download.url at it (a file:// URL or a plain path) with its md5 in download.md5; "
                "see the README's 'Offline data' section")


class RetryableError(Exception):
    """A transfer failure worth another attempt (timeout, dropped connection, 5xx)."""


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def local_source(url: str) -> Path | None:
    """The file a file:// URL or a plain path names; None for a network URL."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "":
        return Path(url)
    if parsed.scheme in ("http", "https"):
        return None
    raise StageError(f"download.url {url!r}: unsupported scheme {parsed.scheme!r}; "
                     "use http(s)://, file:// or a plain path")


def copy_local(source: Path, part: Path) -> None:
    if not source.is_file():
        raise StageError(f"download.url: {source} is not a file; {OFFLINE_HINT}")
    with storage_errors(part), open(source, "rb") as src, open(part, "wb") as dst, \
            tqdm(total=source.stat().st_size, unit="B", unit_scale=True, desc="copy") as bar:
        while block := src.read(CHUNK):
            dst.write(block)
            bar.update(len(block))


def read_block(response: http.client.HTTPResponse, got: int) -> bytes:
    """The next chunk of the body; a network failure here is worth a retry."""
    try:
        return response.read(CHUNK)
    except (TimeoutError, OSError, http.client.HTTPException) as err:
        raise RetryableError(f"transfer broke off after {got} bytes: {err}") from None


def fetch_once(url: str, part: Path, timeout: float) -> None:
    """One HTTP attempt, appending to `part` from its current size when the server allows."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # our .part is already complete, or stale: start over
            part.unlink()
            raise RetryableError(f"HTTP 416 for a resume from byte {have}") from None
        if err.code >= 500 or err.code == 429:
            raise RetryableError(f"HTTP {err.code} {err.reason}") from None
        raise StageError(f"download {url}: HTTP {err.code} {err.reason}; check download.url") from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise RetryableError(f"cannot connect: {reason}") from None
    with response:
        content_type = response.headers.get("Content-Type", "")
        if content_type.startswith("text/html"):
            raise StageError(f"download {url}: the server sent an HTML page, not the archive "
                             "(a login or error page?); check download.url")
        resumed = response.status == 206
        if have and not resumed:
            have = 0  # server ignored Range: restart the file
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        got = have
        with storage_errors(part), open(part, "ab" if resumed else "wb") as out, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, desc="download") as bar:
            while block := read_block(response, got):
                out.write(block)
                got += len(block)
                bar.update(len(block))
        if total is not None and got < total:
            raise RetryableError(f"transfer ended after {got} of {total} bytes")


def fetch(url: str, part: Path, timeout: float, retries: int) -> None:
    """Fetch with bounded retries and exponential back-off, resuming the .part file."""
    for attempt in range(retries + 1):
        try:
            fetch_once(url, part, timeout)
            return
        except RetryableError as err:
            if attempt == retries:
                raise StageError(f"download {url}: {err} (gave up after {retries + 1} attempts); "
                                 f"{OFFLINE_HINT}") from None
            wait = min(BACKOFF_SECONDS * 2 ** attempt, 30.0)
            print(f"download {url}: {err}; retrying in {wait} s", file=sys.stderr)
            time.sleep(wait)


def download(params: DownloadParams, out: Path) -> None:
    """Fetch or copy the archive to `out`, verified by md5; on failure no `out` exists."""
    part = out.with_name(out.name + ".part")
    out.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = local_source(params.url)
    if source is None:
        fetch(params.url, part, params.timeout, params.retries)  # a failed .part stays, to resume
    else:
        part.unlink(missing_ok=True)
        try:
            copy_local(source, part)
        except (StageError, OSError):
            part.unlink(missing_ok=True)  # a local copy is cheap to redo: keep no half file
            raise
    got = md5_of(part)
    if got != params.md5:
        part.unlink()
        raise StageError(f"{params.url}: md5 {got} does not match download.md5 {params.md5}; "
                         "the file is corrupt, truncated or a different archive: fix the source "
                         "or download.md5, then run `dvc repro download`")
    shutil.move(part, out)


@stage_main
def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    download(load_params().download, Path(sys.argv[1]))


if __name__ == "__main__":
    main()
