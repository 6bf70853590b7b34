"""End-to-end: a person's own folder of photos through the real `dvc exp run`, from a local
folder and as a CSV-layout .tar.gz served over http, to evaluated, exported and predicted."""
from __future__ import annotations

import functools
import http.server
import json
import sys
import tarfile
import threading
from pathlib import Path

import pytest
import yaml

from tests.folder_format import CLASSES, write_photos
from tests.test_pipeline import committed, dvc, git, run, shrink

pytestmark = pytest.mark.slow


def init_folder_repo(project: Path) -> Path:
    params = yaml.safe_load((project / "params.yaml").read_text())
    shrink(params)
    params["train"].update(batch_size=16, epochs=8.0, lr=0.1)  # lr per step: a batch of 16, not 1024
    params["finetune"].update(batch_size=16, lr=0.02, head_lr=0.1)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return committed(project)


def csv_archive(photos: Path, path: Path) -> Path:
    """The same photos in the CSV layout (path,label), flat, in a .tar.gz."""
    rows = ["path,label"]
    with tarfile.open(path, "w:gz") as archive:
        for i, image in enumerate(sorted(photos.rglob("*.*"))):
            if image.suffix in (".png", ".jpg"):
                archive.add(image, f"shots/{i}{image.suffix}")
                rows.append(f"{i}{image.suffix},{image.parent.name}")
        listing = photos.parent / "labels.csv"
        listing.write_text("\n".join(rows) + "\n")
        archive.add(listing, "shots/labels.csv")
    return path


def serve(folder: Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_photo_folder_trains_evaluates_exports_and_predicts(project: Path, tmp_path: Path) -> None:
    repo = init_folder_repo(project)
    photos = write_photos(tmp_path / "photos")
    done = dvc(repo, "exp", "run", "-S", "download.dataset=folder", "-S", f"download.url={photos}",
               "-S", "preprocess.size=[64,64]")
    assert "skipped 1 file(s) that are not images" in done.stdout
    card = json.loads((repo / "models" / "finetune" / "model.json").read_text())
    assert card["classes"] == list(CLASSES) and card["input_size"] == [64, 64]
    evaluation = json.loads((repo / "metrics" / "eval" / "finetune.json").read_text())
    assert evaluation["accuracy"] > 0.5  # five colours: far above chance (0.2)
    assert (repo / "models" / "export" / "model.pt2").is_file()
    predicted = run(repo, sys.executable, "-m", "stages.predict", "models/finetune",
                    str(photos / "eel" / "photo_3.jpg"), str(photos / "bee" / "gray.png"))
    assert "photo_3.jpg: eel" in predicted.stdout and "gray.png: " in predicted.stdout

    server = serve(tmp_path)
    try:
        url = f"http://127.0.0.1:{server.server_port}/{csv_archive(photos, tmp_path / 'shots.tar.gz').name}"
        served = dvc(repo, "exp", "run", "-S", "download.dataset=folder", "-S", f"download.url={url}",
                     "-S", "preprocess.size=[64,64]", "-S", "train.epochs=2")
    finally:
        server.shutdown()
    assert "Running stage 'download'" in served.stdout and "has md5" in served.stdout
    assert json.loads((repo / "data" / "images" / "classes.json").read_text()) == list(CLASSES)
    assert json.loads((repo / "models" / "train" / "model.json").read_text())["input_size"] == [64, 64]
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "photos from the archive")
    shown = dvc(repo, "exp", "show", "--csv").stdout
    assert "download.url" not in shown or "folder" in shown
    diff = dvc(repo, "metrics", "diff", "HEAD~1", "--json")
    assert "metrics/eval/train.json" in json.loads(diff.stdout)
