"""A person's own folder of images: found, checked, fitted to one size, packed; and bad folders
refused naming the file, with nothing partial left behind."""
from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.download import copy_folder, download
from stages.extract import extract_archive
from stages.lib.data import CsvImageDataset, Pack
from stages.lib.datasets import DATASETS
from stages.lib.outputs import StageError
from stages.lib.params import DownloadParams, PreprocessParams
from stages.preprocess import preprocess
from tests.folder_format import CLASSES, png_bomb, write_photos

FOLDER = DATASETS["folder"]


def params(**changes: object) -> PreprocessParams:
    return PreprocessParams(**{"val_fraction": 0.1, "seed": 0, "workers": 2, "size": [24, 32], **changes})


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos") / "photos")


@pytest.fixture(scope="module")
def prepared(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "images"
    preprocess(photos, out, params(), FOLDER)
    return out


def test_a_mixed_folder_becomes_one_size_rgb_with_a_carved_test_split(prepared: Path, capsys) -> None:
    assert json.loads((prepared / "classes.json").read_text()) == list(CLASSES)
    sizes = {split: len(Pack(prepared, split, 5)) for split in ("train", "val", "test")}
    # 62 images: 12 a class, and the grayscale and RGBA ones; 20% of each class held out for test
    assert sum(sizes.values()) == 62 and sizes["test"] == 12
    assert Pack(prepared, "train", 5).shape[1:] == (3, 24, 32)
    test_labels = Pack(prepared, "test", 5).labels
    assert np.bincount(test_labels.numpy()).tolist() == [2, 3, 3, 2, 2]  # stratified: round(0.2 n)


def test_the_pack_holds_the_pngs_pixels_and_labels_in_csv_order(photos: Path, tmp_path: Path) -> None:
    preprocess(photos, tmp_path / "images", params(), FOLDER, tmp_path / "packed")
    prepared = tmp_path / "images"
    for split in ("train", "val", "test"):
        pack = Pack(tmp_path / "packed", split, 5)
        dataset = CsvImageDataset(prepared / f"{split}.csv", prepared)
        packed = pack.read_all()
        assert len(dataset) == len(pack)
        for i in range(len(dataset)):
            image, label = dataset[i]
            assert np.array_equal(np.asarray(image).transpose(2, 0, 1), packed[i])
            assert label == pack.labels[i]
        order = np.array([3, 0, 1, 2, len(pack) - 1])
        assert np.array_equal(pack.read(order), packed[order])


def test_a_non_image_file_is_skipped_and_counted(photos: Path, tmp_path: Path, capsys) -> None:
    preprocess(photos, tmp_path / "images", params(), FOLDER)
    assert "skipped 1 file(s) that are not images: apple/notes.txt" in capsys.readouterr().out


def test_an_all_grayscale_folder_stays_one_channel_and_rgba_becomes_rgb(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / "src" / "train" / name).mkdir(parents=True)
        (tmp_path / "src" / "test" / name).mkdir(parents=True)
        for split in ("train", "test"):
            for i in range(3):
                Image.new("L", (20, 20), 40 + 100 * (name == "b")).save(tmp_path / "src" / split / name / f"{i}.png")
    preprocess(tmp_path / "src", tmp_path / "gray", params(size=None), FOLDER)
    assert Pack(tmp_path / "gray", "train", 2).shape[1:] == (1, 20, 20)
    assert len(Pack(tmp_path / "gray", "test", 2)) == 6  # the folder's own test split, nothing carved
    Image.new("RGBA", (20, 20), (10, 20, 30, 0)).save(tmp_path / "src" / "test" / "a" / "0.png")
    preprocess(tmp_path / "src", tmp_path / "rgb", params(size=None), FOLDER)
    assert Pack(tmp_path / "rgb", "train", 2).shape[1:] == (3, 20, 20)


def test_a_csv_layout_with_class_names_reads_like_the_folder(photos: Path, tmp_path: Path) -> None:
    source = tmp_path / "csv"
    rows = ["file,class_name"]
    (source / "img").mkdir(parents=True)
    for i, path in enumerate(sorted(photos.rglob("photo_*"))):
        (source / "img" / f"{i}{path.suffix}").write_bytes(path.read_bytes())
        rows.append(f"img/{i}{path.suffix},{path.parent.name}")
    (source / "labels.csv").write_text("\n".join(rows).replace("file,", "path,", 1) + "\n")
    preprocess(source, tmp_path / "images", params(), FOLDER)
    assert json.loads((tmp_path / "images" / "classes.json").read_text()) == list(CLASSES)
    assert sum(len(Pack(tmp_path / "images", s, 5)) for s in ("train", "val", "test")) == 60


def test_mixed_sizes_without_preprocess_size_name_a_file(photos: Path, tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"photo_\d\.\w+: \d+x\d+ pixels, but .* set preprocess.size"):
        preprocess(photos, tmp_path / "images", params(size=None), FOLDER)
    assert not (tmp_path / "images").exists() and os.listdir(tmp_path) == []


def copy_of(photos: Path, dest: Path) -> Path:
    for path in photos.rglob("*"):
        target = dest / path.relative_to(photos)
        if path.is_dir():
            target.mkdir(parents=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return dest


def empty_class(root: Path) -> str:
    (root / "fig").mkdir()
    return r"fig: class folder holds no image"


def zero_byte(root: Path) -> str:
    (root / "bee" / "blank.jpg").write_bytes(b"")
    return r"bee/blank.jpg: empty \(0 bytes\)"


def bomb(root: Path) -> str:
    png_bomb(root / "eel" / "huge.png")
    return r"eel/huge.png: (declares 50000 x 50000 pixels|not a readable image)"


def csv_missing_file(root: Path) -> str:
    (root / "labels.csv").write_text("path,label\napple/photo_0.png,apple\napple/gone.png,apple\n")
    return r"labels.csv:3: image 'apple/gone.png' does not exist"


def csv_unknown_class(root: Path) -> str:
    (root / "train.csv").write_text("path,class_name\napple/photo_0.png,apple\nbee/photo_0.png,bee\n")
    (root / "test.csv").write_text("path,class_name\neel/photo_0.png,eel\n")
    return r"test.csv: the row for photo_0.png names class 'eel', not among the training classes"


def csv_outside(root: Path) -> str:
    (root / "labels.csv").write_text("path,label\n../elsewhere.png,apple\napple/photo_0.png,apple\n")
    return r"labels.csv:2: path '../elsewhere.png' is outside the CSV's folder"


@pytest.mark.parametrize("spoil", [empty_class, zero_byte, bomb, csv_missing_file, csv_unknown_class,
                                   csv_outside])
def test_a_bad_folder_fails_naming_the_file_and_writes_nothing(photos: Path, tmp_path: Path, spoil) -> None:
    source = copy_of(photos, tmp_path / "source")
    message = spoil(source)
    with pytest.raises(StageError, match=message):
        preprocess(source, tmp_path / "out" / "images", params(), FOLDER)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_a_link_out_of_the_folder_is_refused_by_download(photos: Path, tmp_path: Path) -> None:
    source = copy_of(photos, tmp_path / "source")
    (tmp_path / "secret.png").write_bytes((source / "apple" / "photo_0.png").read_bytes())
    (source / "apple" / "linked.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(StageError, match=r"apple/linked.png: a link; the image folder must hold plain files"):
        copy_folder(source, tmp_path / "raw" / "folder")
    assert os.listdir(tmp_path / "raw") == []


def tar_with(path: Path, members: dict[str, bytes], link: tuple[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link[0])
            info.type, info.linkname = tarfile.SYMTYPE, link[1]
            archive.addfile(info)
    return path


@pytest.mark.parametrize("members, link, message", [
    ({"photos/../../evil.png": b"x"}, None, r"member 'photos/../../evil.png' points outside the folder"),
    ({"/etc/evil.png": b"x"}, None, r"member '/etc/evil.png' points outside the folder"),
    ({"photos/a/1.png": b"x"}, ("photos/a/2.png", "/etc/passwd"), r"member 'photos/a/2.png' is a link"),
])
def test_a_hostile_archive_is_refused_before_anything_is_written(tmp_path: Path, members, link, message) -> None:
    archive = tar_with(tmp_path / "photos.tar.gz", members, link)
    (tmp_path / "out").mkdir()
    with pytest.raises(StageError, match=message):
        extract_archive(archive, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []


def test_a_zip_extracts_its_folder(photos: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as archive:
        for path in sorted(photos.rglob("*")):
            if path.is_file():
                archive.write(path, f"photos/{path.relative_to(photos)}")
    count = extract_archive(tmp_path / "photos.zip", tmp_path / "out")
    assert count == 63 and (tmp_path / "out" / "photos" / "eel" / "photo_0.png").is_file()


def test_dataset_folder_needs_a_url(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"download.url: dataset folder takes your images from"):
        download(DownloadParams("folder", None, None, 30, 3), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_predict_names_a_bomb_and_a_missing_file(tmp_path: Path) -> None:
    from stages.predict import prepare

    with pytest.raises(StageError, match=r"huge.png: (declares 50000 x 50000 pixels|not a readable image)"):
        prepare([png_bomb(tmp_path / "huge.png")], (3, 32, 32))
    with pytest.raises(StageError, match=r"gone.jpg: image file does not exist"):
        prepare([tmp_path / "gone.jpg"], (3, 32, 32))
