"""Every data set through download, extract and preprocess, in its real distribution format:
MNIST and Fashion-MNIST as four gzip'd IDX files, CIFAR-100 as its python tarball."""
from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import stages.lib.datasets
from stages.download import download
from stages.extract import extract
from stages.lib.datasets import DATASETS, IDX_FILES, Dataset
from stages.lib.outputs import StageError
from stages.lib.params import DownloadParams, PreprocessParams, load_params
from stages.preprocess import preprocess
from tests.cifar_format import CIFAR100_FINE, cifar100_members, dumps_py2, write_tarball
from tests.conftest import ROOT
from tests.folder_format import write_folder
from tests.idx_format import idx_bytes, idx_payloads, write_idx_files

SPLIT = PreprocessParams(val_fraction=0.25, seed=0, workers=1)


def test_every_data_set_declares_its_checksums() -> None:
    for dataset in DATASETS.values():
        assert all(len(md5) == 32 for md5 in dataset.md5.values())
        assert (dataset.format == "idx") == (list(dataset.md5) == list(IDX_FILES))


def through_preprocess(tmp_path: Path, name: str, url: str, md5: object) -> Path:
    """download -> extract -> preprocess, as the stages run them."""
    raw, extracted, images = tmp_path / "raw" / name, tmp_path / "extracted" / name, tmp_path / "images"
    download(DownloadParams(dataset=name, url=url, md5=md5, timeout=5.0, retries=0), raw)
    extract(raw, extracted, DATASETS[name])
    preprocess(extracted, images, SPLIT, DATASETS[name])
    return images


def test_a_data_set_added_in_one_entry_is_accepted_by_params_and_prepared(tmp_path, monkeypatch) -> None:
    """Adding a data set: one entry in datasets.DATASETS. Here an IDX one whose official home
    is a folder of generated files; params accepts it and resolves its flips, the data stages
    build its image folder."""
    home = tmp_path / "home"
    md5 = write_idx_files(home, idx_payloads())
    kana = tuple(f"kana_{i}" for i in range(10))
    monkeypatch.setitem(DATASETS, "kmnist", Dataset("kmnist", "idx", f"{home}/", md5, classes=kana, flips=False))
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["download"]["dataset"] = "kmnist"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "params.yaml")
    assert params.download.dataset == "kmnist" and params.train.flip is False and params.train.tta == "none"
    images = through_preprocess(tmp_path, "kmnist", None, None)
    assert json.loads((images / "classes.json").read_text()) == list(kana)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_data_sets_become_a_grayscale_image_folder(tmp_path: Path, name: str) -> None:
    mirror = tmp_path / "mirror"
    md5 = write_idx_files(mirror, idx_payloads())
    images = through_preprocess(tmp_path, name, str(mirror), md5)
    assert json.loads((images / "classes.json").read_text()) == list(DATASETS[name].classes)
    stats = json.loads((images / "normalization.json").read_text())
    assert len(stats["mean"]) == len(stats["std"]) == 1  # one channel
    rows = (images / "train.csv").read_text().splitlines()
    assert rows[0] == "path,label,class_name" and len(rows) == 1 + 90  # 120 less a quarter
    assert len((images / "test.csv").read_text().splitlines()) == 1 + 20
    path, label, class_name = rows[1].split(",")
    png = Image.open(images / path)
    assert png.mode == "L" and png.size == (28, 28)
    assert class_name == DATASETS[name].classes[int(label)]
    # the bar of the fixture's digit sits at the label's row: pixels survived exactly
    assert np.asarray(png)[2 + 2 * int(label), 14] == 255


def test_the_official_mnist_checksums_are_used_when_md5_is_null(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    write_idx_files(mirror, idx_payloads())
    with pytest.raises(StageError, match=f"does not match download.md5 {DATASETS['mnist'].md5[IDX_FILES[0]]}"):
        download(DownloadParams("mnist", mirror.as_uri(), None, 5.0, 0), tmp_path / "raw")
    assert not (tmp_path / "raw").exists() and not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("md5, message", [
    ("0" * 32, "mnist is four files; give a mapping"),
    ({IDX_FILES[0]: "0" * 32}, "mnist is four files; give a mapping"),
])
def test_a_mirror_needs_a_checksum_per_file(tmp_path: Path, md5, message) -> None:
    with pytest.raises(StageError, match=message):
        download(DownloadParams("mnist", str(tmp_path), md5, 5.0, 0), tmp_path / "raw")


def corrupted(tmp_path: Path, name: str, payload: bytes) -> tuple[Path, Path]:
    """Raw MNIST files with `name` replaced by gzip(payload); returns (raw dir, out dir)."""
    payloads = {**idx_payloads(), name: payload}
    raw = tmp_path / "raw"
    write_idx_files(raw, payloads)
    return raw, tmp_path / "extracted"


def labels_file(labels: list[int]) -> bytes:
    return idx_bytes(np.array(labels, dtype=np.uint8))


TRAIN_LABELS = idx_payloads()[IDX_FILES[1]]


@pytest.mark.parametrize("name, payload, message", [
    (IDX_FILES[1], b"\0\0\x09\x01" + TRAIN_LABELS[4:], "not an IDX file of unsigned bytes"),
    (IDX_FILES[1], TRAIN_LABELS[:2], "not an IDX file"),
    (IDX_FILES[1], TRAIN_LABELS[:6], "IDX header ends after"),
    (IDX_FILES[1], TRAIN_LABELS[:-5], "ends 5 bytes short"),
    (IDX_FILES[1], TRAIN_LABELS + b"\0", "inflates past the 128 bytes its header declares"),
    (IDX_FILES[0], b"\0\0\x08\x03" + b"\xff\xff\xff\xff" * 3, "more than"),
])
def test_extract_refuses_bad_idx_files_naming_them(tmp_path: Path, name, payload, message) -> None:
    raw, out = corrupted(tmp_path, name, payload)
    with pytest.raises(StageError, match=message) as err:
        extract(raw, out, DATASETS["mnist"])
    assert name in str(err.value)
    assert not out.exists() and not list(out.parent.glob(".*tmp"))


def test_a_gzip_bomb_is_refused_after_reading_no_more_than_its_header_declares(tmp_path: Path) -> None:
    """A labels file declaring 120 labels that inflates to 200 MB of zeros."""
    raw = tmp_path / "raw"
    write_idx_files(raw, idx_payloads())
    bomb = gzip.compress(TRAIN_LABELS + bytes(200 << 20), compresslevel=1, mtime=0)
    (raw / IDX_FILES[1]).write_bytes(bomb)
    start = time.perf_counter()
    with pytest.raises(StageError, match="inflates past"):
        extract(raw, tmp_path / "out", DATASETS["mnist"])
    assert len(bomb) < 1 << 20 and time.perf_counter() - start < 5  # stopped early, not inflated
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, payload, message", [
    (IDX_FILES[1], labels_file([0] * 119), "119 labels for the 120 images"),
    (IDX_FILES[3], labels_file([10] + [0] * 19), "label 10 at row 0 is outside \\[0, 10\\)"),
    (IDX_FILES[1], idx_bytes(np.zeros((120, 1, 1), dtype=np.uint8)), "expected 1 non-zero"),
    (IDX_FILES[0], idx_bytes(np.zeros((120, 28), dtype=np.uint8)), "expected 3 non-zero"),
    (IDX_FILES[2], idx_bytes(np.zeros((20, 32, 32), dtype=np.uint8)), "images of \\(32, 32\\) pixels"),
])
def test_preprocess_refuses_idx_files_that_do_not_fit_together(tmp_path: Path, name, payload, message) -> None:
    raw, out = corrupted(tmp_path, name, payload)
    extract(raw, out, DATASETS["mnist"])
    with pytest.raises(StageError, match=message):
        preprocess(out, tmp_path / "images", SPLIT, DATASETS["mnist"])
    assert not (tmp_path / "images").exists()


def test_cifar100_becomes_a_folder_of_its_100_fine_classes(tmp_path: Path) -> None:
    tarball = tmp_path / "mirror" / "c100.tar.gz"
    tarball.parent.mkdir()
    md5 = write_tarball(tarball, cifar100_members(per_class=4), base="cifar-100-python")
    images = through_preprocess(tmp_path, "cifar100", tarball.as_uri(), md5)
    assert json.loads((images / "classes.json").read_text()) == CIFAR100_FINE
    assert len(json.loads((images / "normalization.json").read_text())["mean"]) == 3
    assert len((images / "train.csv").read_text().splitlines()) == 1 + 300  # a quarter of 400 to val
    assert len(list((images / "train").iterdir())) == 100  # one folder per class


def test_a_cifar10_tarball_is_not_taken_for_cifar100(tarball, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "cifar-100-python.tar.gz").write_bytes(tarball[0].read_bytes())
    with pytest.raises(StageError, match="is outside cifar-100-python/"):
        extract(raw, tmp_path / "out", DATASETS["cifar100"])


def test_the_idx_size_cap_is_what_refuses_absurd_headers(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(stages.lib.datasets, "MAX_IDX_BYTES", 1000)
    raw, out = corrupted(tmp_path, IDX_FILES[1], TRAIN_LABELS)
    with pytest.raises(StageError, match="more than 1000"):
        extract(raw, out, DATASETS["mnist"])


FOLDERS = {  # name -> (how to build it, (channels, height, width), classes)
    "mnist": ("the real IDX format, through download, extract and preprocess", (1, 28, 28), 10),
    "fashion_mnist": ("the real IDX format, through download, extract and preprocess", (1, 28, 28), 10),
    "cifar100": ("the real python tarball, through download, extract and preprocess", (3, 32, 32), 100),
    "custom_40x40_12": ("a user's own folder, written directly", (3, 40, 40), 12),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    built = {}
    for name in ("mnist", "fashion_mnist"):
        tmp = tmp_path_factory.mktemp(name)
        md5 = write_idx_files(tmp / "mirror", idx_payloads())
        built[name] = through_preprocess(tmp, name, str(tmp / "mirror"), md5)
    tmp = tmp_path_factory.mktemp("cifar100")
    tarball = tmp / "c100.tar.gz"
    md5 = write_tarball(tarball, cifar100_members(per_class=2), base="cifar-100-python")
    built["cifar100"] = through_preprocess(tmp, "cifar100", str(tarball), md5)
    built["custom_40x40_12"] = write_folder(tmp_path_factory.mktemp("custom") / "images", 3, 40, 12,
                                            {"train": 8, "val": 2, "test": 3})
    return built


@pytest.mark.slow
@pytest.mark.parametrize("name, arch, balance, learnable", [
    ("mnist", "mnist_mlp", "none", True),
    ("mnist", "airbench", "balanced", True),
    ("fashion_mnist", "mlp", "none", True),
    ("cifar100", "lenet", "none", False),  # random pixels: nothing to learn, everything to shape
    ("custom_40x40_12", "lenet", "none", True),  # resnet18's shapes: tests/test_model.py
])
def test_any_folder_trains_evaluates_exports_and_predicts(folders: dict[str, Path], tmp_path: Path,
                                                          name: str, arch: str, balance: str,
                                                          learnable: bool) -> None:
    """Everything after preprocess takes channels, size and classes from the folder; nothing
    assumes CIFAR-10's 3 x 32 x 32 and 10 classes. The imbalance options are recorded."""
    from stages.evaluate import evaluate
    from stages.export import export
    from stages.lib.params import EvaluateParams
    from stages.predict import top_k
    from tests.test_train import stage_dir, train

    folder, (channels, height, width), num_classes = folders[name], *FOLDERS[name][1:]
    cwd = stage_dir(tmp_path, folder, arch=arch, optimizer="adam", lr=0.003, flip=False,
                    label_smoothing=0.0, epochs=6.0 if learnable else 1.0, batch_size=10,
                    progressive_from=0, select_from=0, freeze_from=0,  # fixed-size MLPs, no
                    # blocks to freeze; the balanced sampler refuses selection
                    device="cpu", amp=False, class_weights=balance,  # float32: bf16 airbench
                    # does not learn MNIST-like inputs (README, Tutorials)
                    sampler="balanced" if balance == "balanced" else "shuffle")
    result = train(cwd, "m")
    assert result.returncode == 0, result.stderr
    card = json.loads((cwd / "models/m/model.json").read_text())
    assert card["input_size"] == [height, width] and len(card["normalization"]["mean"]) == channels
    assert len(card["classes"]) == num_classes and card["params"]["class_weights"] == balance
    evaluate(folder, cwd / "metrics/eval", cwd / "plots/eval", [cwd / "models/m"],
             EvaluateParams(batch_size=50, device="cpu", amp=False, misclassified=8))
    accuracy = json.loads((cwd / "metrics/eval/m.json").read_text())["accuracy"]
    confusion = (cwd / "plots/eval/m/confusion.csv").read_text().splitlines()
    assert len(confusion) == 1 + num_classes ** 2
    if learnable:
        assert accuracy >= 3 / num_classes, accuracy  # chance is 1 / classes: a broken path stays near it
    export(cwd / "models/m", cwd / "export")
    program = torch.export.load(cwd / "export" / "model.pt2").module()
    assert program(torch.rand(2, channels, height, width)).shape == (2, num_classes)
    image = next((folder / "test").glob("*/*.png"))
    other = tmp_path / "other.png"  # any mode and size: converted to the model's
    Image.open(image).convert("RGB").resize((2 * width, height)).save(other)
    [(predicted, probability)] = top_k(cwd / "models/m", [other], 1)[0]
    assert predicted in card["classes"] and 0 < probability <= 1


@pytest.mark.parametrize("member, payload, message", [
    ("meta", b"cos\nsystem\n(S'echo owned'\ntR.", "meta: refuses to load global os.system"),
    ("meta", dumps_py2({b"coarse_label_names": [b"a"]}), "expected key 'fine_label_names'"),
    ("train", dumps_py2({b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": [0, 1, 2, 100]}),
     "label 100 at row 3 is outside \\[0, 100\\)"),
    ("test", dumps_py2({b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": [0, 1]}),
     "2 labels for 4 images"),
    ("test", dumps_py2({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}),
     "missing key 'fine_labels'"),
])
def test_bad_cifar100_members_are_refused_naming_the_file(tmp_path: Path, member, payload, message) -> None:
    tarball = tmp_path / "raw" / "cifar-100-python.tar.gz"
    tarball.parent.mkdir()
    write_tarball(tarball, {**cifar100_members(), member: payload}, base="cifar-100-python")
    extract(tarball.parent, tmp_path / "extracted", DATASETS["cifar100"])
    with pytest.raises(StageError, match=message) as err:
        preprocess(tmp_path / "extracted", tmp_path / "images", SPLIT, DATASETS["cifar100"])
    assert f"extracted/{member}" in str(err.value) and not (tmp_path / "images").exists()
