import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.lib.datasets import DATASETS
from stages.lib.outputs import StageError
from stages.lib.params import PreprocessParams
from stages.preprocess import load_pickle, preprocess, stratified_val
from tests.cifar_format import CLASSES, batch_members, dumps_py2, unpickle_trusted

CIFAR10 = DATASETS["cifar10"]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_preprocess_writes_csvs_classes_and_stats(image_folder: Path) -> None:
    assert json.loads((image_folder / "classes.json").read_text()) == CLASSES
    counts = {s: len(read_rows(image_folder / f"{s}.csv")) for s in ("train", "val", "test")}
    assert counts == {"train": 90, "val": 10, "test": 20}
    stats = json.loads((image_folder / "normalization.json").read_text())
    assert len(stats["mean"]) == 3 and all(0 < s for s in stats["std"])
    for row in read_rows(image_folder / "train.csv"):
        assert row["class_name"] == CLASSES[int(row["label"])]
        assert row["path"].startswith(f"train/{row['class_name']}/")
        assert (image_folder / row["path"]).is_file()


def test_png_pixels_round_trip_exactly(image_folder: Path) -> None:
    members = batch_members()
    test = unpickle_trusted(members["test_batch"])
    for row in read_rows(image_folder / "test.csv"):
        index = int(Path(row["path"]).stem)
        pixels = np.asarray(Image.open(image_folder / row["path"]))
        assert np.array_equal(pixels, test[b"data"][index].reshape(3, 32, 32).transpose(1, 2, 0))
        assert int(row["label"]) == test[b"labels"][index]


def test_train_and_val_partition_the_training_batches(image_folder: Path) -> None:
    train = read_rows(image_folder / "train.csv")
    val = read_rows(image_folder / "val.csv")
    names = [Path(r["path"]).name for r in train + val]
    assert sorted(names, key=lambda n: int(n[:-4])) == [f"{i}.png" for i in range(100)]
    assert sorted(int(r["label"]) for r in val) == list(range(10))  # one per class


def test_stratified_split_keeps_class_shares_and_is_seeded() -> None:
    labels = np.repeat(np.arange(10), 500)
    mask = stratified_val(labels, 0.1, seed=3)
    assert np.bincount(labels[mask]).tolist() == [50] * 10
    assert np.array_equal(mask, stratified_val(labels, 0.1, seed=3))
    assert not np.array_equal(mask, stratified_val(labels, 0.1, seed=4))
    assert not stratified_val(labels, 0.0, seed=3).any()


def test_val_fraction_zero_writes_no_val_split(batches_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "images"
    preprocess(batches_dir, out, PreprocessParams(val_fraction=0.0, seed=0, workers=1), CIFAR10)
    assert not (out / "val.csv").exists()
    assert len(read_rows(out / "train.csv")) == 100


def corrupt(batches_dir: Path, tmp_path: Path, name: str, payload: bytes) -> Path:
    copy = tmp_path / "batches"
    copy.mkdir()
    for f in batches_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / name).write_bytes(payload)
    return copy


class Evil:
    def __reduce__(self):
        return (print, ("owned",))


def batch_with(**changes) -> bytes:
    batch = unpickle_trusted(batch_members()["data_batch_1"])
    batch.update({k.encode(): v for k, v in changes.items()})
    return dumps_py2(batch)


@pytest.mark.parametrize("payload, message", [
    (pickle.dumps(Evil(), protocol=2), "refuses to load global __builtin__.print"),
    (pickle.dumps({"data": Evil()}, protocol=4), "refuses to load global builtins.print"),
    (batch_with(data=np.zeros((20, 100), np.uint8)), r"shape \(N, 3072\), found \(20, 100\)"),
    (batch_with(data=np.zeros((20, 3072), np.float32)), "must be a uint8 array, found float32"),
    (batch_with(labels=[10] * 20), r"label 10 at row 0 is outside \[0, 10\)"),
    (batch_with(labels=[0] * 19), "19 labels for 20 images"),
    (pickle.dumps([1, 2, 3], protocol=2), "expected a dict, found list"),
    (b"\x80\x02not a pickle", "not a readable pickle"),
])
def test_preprocess_refuses_bad_batches_and_writes_nothing(batches_dir, tmp_path, payload, message) -> None:
    source = corrupt(batches_dir, tmp_path, "data_batch_2", payload)
    out = tmp_path / "images"
    with pytest.raises(StageError, match=message) as err:
        preprocess(source, out, PreprocessParams(val_fraction=0.1, seed=0, workers=1), CIFAR10)
    assert "data_batch_2" in str(err.value)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["batches"]


def test_restricted_unpickler_admits_both_numpy_spellings(tmp_path: Path) -> None:
    payload = dumps_py2({b"data": np.arange(3, dtype=np.uint8)})  # numpy.core spelling
    modern = payload.replace(b"cnumpy.core.multiarray\n", b"cnumpy._core.multiarray\n")
    for i, blob in enumerate((payload, modern)):
        path = tmp_path / f"b{i}"
        path.write_bytes(blob)
        assert load_pickle(path)["data"].tolist() == [0, 1, 2]


def test_hostile_class_names_are_refused(batches_dir, tmp_path) -> None:
    meta = dumps_py2({b"label_names": [b"../../etc"] + [c.encode() for c in CLASSES[1:]]})
    source = corrupt(batches_dir, tmp_path, "batches.meta", meta)
    with pytest.raises(StageError, match="class name '../../etc'"):
        preprocess(source, tmp_path / "images", PreprocessParams(val_fraction=0.1, seed=0, workers=1), CIFAR10)
