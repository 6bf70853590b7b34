"""download: params download.* -> data/raw/<dataset>/ (the data set's files, md5-verified).

usage: python -m stages.download OUT_DIR

`download.dataset: folder` takes a person's own images: `download.url` a local folder (copied
into OUT_DIR/images, refusing links and special files) or a .tar, .tar.gz, .tgz or .zip of one
(a plain path, file:// or http(s) URL), fetched as below and checked against `download.md5`
when one is given (its md5 is printed either way, to pin it).

`download.dataset` names the data set (stages/lib/datasets.py); `download.url` null means its
official location, else a mirror: the tarball (CIFAR) or the folder holding the four .gz files
(MNIST-style), as an http(s):// or file:// URL or a plain path. `download.md5` null means the
official checksums; a mirror with other bytes gives its own (a {file: md5} mapping for IDX).
HTTP(S) downloads stream to OUT_DIR-<file>.part beside OUT_DIR with timeouts, bounded retries
with back-off and Range resume; local files are copied the same way. Every md5 is checked
before OUT_DIR appears, complete, in one rename.
"""
from __future__ import annotations

from stages.lib.params import preflight

preflight(__name__, __doc__)  # --help, and bad params.yaml, answered before the slow imports

import hashlib
import http.client
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from stages.lib.datasets import DATASETS
from stages.lib.outputs import StageError, atomic_dir, stage_main, storage_errors
from stages.lib.params import DownloadParams, load_params

CHUNK = 1 << 20
BACKOFF_SECONDS = 1.0  # first wait between attempts; doubles each time, at most 30 s
OFFLINE_HINT = ("if this machine is offline, copy the data set's files locally and point "
                "download.url at them (a file:// URL or a plain path) with their md5 in "
                "download.md5; see docs/setup.md, 'Offline data'")


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
        return Path(url).expanduser()
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


def sources(params: DownloadParams) -> list[tuple[str, str, str]]:
    """(url, file name, md5) of every file the data set needs, from params and datasets.py."""
    dataset = DATASETS[params.dataset]
    location = params.url or dataset.url
    md5 = params.md5 or dataset.md5
    if dataset.format == "cifar":
        if isinstance(md5, dict):
            raise StageError(f"download.md5: {params.dataset} is one tarball; give its md5 as a "
                             f"string, not a mapping ({md5})")
        [(name, official)] = dataset.md5.items()
        return [(location, name, md5 if params.md5 else official)]
    if not isinstance(md5, dict) or set(md5) != set(dataset.md5):
        raise StageError(f"download.md5: {params.dataset} is four files; give a mapping of "
                         f"{sorted(dataset.md5)} to their md5s (or null for the official ones), "
                         f"found {md5!r}")
    folder = location if location.endswith("/") else location + "/"
    return [(folder + name, name, md5[name]) for name in dataset.md5]


def fetch_verified(url: str, part: Path, md5: str | None, params: DownloadParams) -> None:
    """`url` into `part`, checked against `md5` (None: printed, not checked); a failed check
    deletes `part`."""
    source = local_source(url)
    if source is None:
        fetch(url, part, params.timeout, params.retries)  # a failed .part stays, to resume
    else:
        part.unlink(missing_ok=True)
        try:
            copy_local(source, part)
        except (StageError, OSError):
            part.unlink(missing_ok=True)  # a local copy is cheap to redo: keep no half file
            raise
    got = md5_of(part)
    if md5 is None:
        print(f"download: {url} has md5 {got}; set download.md5 to it to check it on every run")
        return
    if got != md5:
        part.unlink()
        raise StageError(f"{url}: md5 {got} does not match download.md5 {md5} (the official "
                         "checksum when download.md5 is null); the file is corrupt, truncated or "
                         "a different one: fix the source or download.md5, then run "
                         "`dvc repro download`")


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
FOLDER_COPY = "images"  # the name of a copied local folder inside OUT_DIR


def copy_folder(source: Path, out: Path) -> int:
    """A local image folder into `out`/images, file by file: a link (which could lead outside
    the folder) or a special file is refused, naming it. Returns the number of files."""
    count = 0
    with atomic_dir(out) as tmp:
        for folder, dirs, files in os.walk(source):
            here = Path(folder)
            target = tmp / FOLDER_COPY / here.relative_to(source)
            target.mkdir(parents=True)
            for name in sorted(dirs + files):
                path = here / name
                if path.is_symlink() or not (path.is_dir() or path.is_file()):
                    kind = "a link" if path.is_symlink() else "not a regular file"
                    raise StageError(f"{path}: {kind}; the image folder must hold plain files and "
                                     "folders only (copy the file itself in, or remove it)")
                if path.is_file():
                    shutil.copyfile(path, target / name)
                    count += 1
    return count


def download_folder(params: DownloadParams, out: Path) -> None:
    """`download.dataset: folder`: a local folder copied, or one archive fetched or copied."""
    if params.url is None:
        raise StageError("download.url: dataset folder takes your images from download.url: set "
                         "it to the folder, or a .tar/.tar.gz/.zip of it (a path or URL)")
    source = local_source(params.url)
    if source is not None and source.is_dir():
        count = copy_folder(source, out)
        print(f"download: folder, {count} file(s) copied from {source} into {out}")
        return
    name = Path(urllib.parse.urlparse(params.url).path).name
    if not name.lower().endswith(ARCHIVE_SUFFIXES):
        raise StageError(f"download.url {params.url!r}: expected a folder, or an archive named "
                         f"*{', *'.join(ARCHIVE_SUFFIXES)}")
    assert not isinstance(params.md5, dict)  # DownloadParams.check refuses a mapping for folder
    part = out.with_name(f"{out.name}-{name}.part")
    fetch_verified(params.url, part, params.md5, params)
    with atomic_dir(out) as tmp:
        shutil.move(part, tmp / name)
    print(f"download: folder, {name} into {out}")


def download(params: DownloadParams, out: Path) -> None:
    """Fetch or copy the data set's files into `out`, each verified by md5; on failure no
    `out` exists (HTTP .part files stay beside it, to resume)."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if DATASETS[params.dataset].format == "folder":
        download_folder(params, out)
        return
    files = sources(params)
    parts = [out.with_name(f"{out.name}-{name}.part") for _, name, _ in files]
    for (url, _, md5), part in zip(files, parts):
        fetch_verified(url, part, md5, params)
    with atomic_dir(out) as tmp:
        for (_, name, _), part in zip(files, parts):
            shutil.move(part, tmp / name)
    print(f"download: {params.dataset}, {len(files)} file(s) verified into {out}")


@stage_main
def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    download(load_params().download, Path(sys.argv[1]))


if __name__ == "__main__":
    main()
