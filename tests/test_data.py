from pathlib import Path

import pytest
import torch

from stages.lib import data
from stages.lib.data import CsvImageDataset, decode_split
from stages.lib.outputs import StageError


def test_csv_dataset_yields_images_and_labels(image_folder: Path) -> None:
    dataset = CsvImageDataset(image_folder / "val.csv", image_folder)
    assert len(dataset) == 10
    image, label = dataset[0]
    assert image.size == (32, 32) and image.mode == "RGB"
    assert 0 <= label < 10
    with_transform = CsvImageDataset(image_folder / "val.csv", image_folder, transform=lambda im: im.size)
    assert with_transform[0] == ((32, 32), label)


@pytest.mark.parametrize("workers, chunk", [(1, 2500), (2, 3), (1, 3)])
def test_decode_split_matches_the_per_sample_dataset(image_folder: Path, monkeypatch, workers,
                                                     chunk) -> None:
    monkeypatch.setattr(data, "DECODE_CHUNK", chunk)  # 3: seven chunks, in processes or not
    images, labels = decode_split(image_folder / "test.csv", image_folder, 10, workers)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    dataset = CsvImageDataset(image_folder / "test.csv", image_folder)
    for i in range(20):
        image, label = dataset[i]
        expected = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(32, 32, 3)
        assert torch.equal(images[i], expected.permute(2, 0, 1))
        assert labels[i].item() == label


def write_csv(folder: Path, rows: list[str], header: str = "path,label,class_name") -> Path:
    path = folder / "custom.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.mark.parametrize("rows, header, message", [
    (["../outside.png,0,airplane"], "path,label,class_name", "is outside the image folder"),
    (["/etc/passwd,0,airplane"], "path,label,class_name", "is outside the image folder"),
    (["a/../../outside.png,0,airplane"], "path,label,class_name", "is outside the image folder"),
    (["a/../..,0,airplane"], "path,label,class_name", "is outside the image folder"),
    (["evil.png,0,airplane"], "path,label,class_name", "is outside the image folder"),
    (["linked/outside.png,0,airplane"], "path,label,class_name", "is outside the image folder"),
    (["test/airplane/0.png,x,airplane"], "path,label,class_name", "label must be an integer"),
    (["test/airplane/0.png,10,airplane"], "path,label,class_name", "label must be an integer in \\[0, 10\\)"),
    (["test/airplane/0.png,-1,airplane"], "path,label,class_name", "label must be an integer"),
    (["a.png,0,airplane"], "file,label", "header must be path,label,class_name"),
    (["test/airplane/0.png,0"], "path,label,class_name", "expected 3 fields"),
])
def test_bad_csv_rows_are_refused_with_file_and_line(image_folder: Path, tmp_path, rows, header, message) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    (tmp_path / "outside.png").write_bytes(b"")
    (folder / "evil.png").symlink_to(tmp_path / "outside.png")  # a file linked out of the folder
    (folder / "linked").symlink_to(tmp_path)  # a directory linked out of it
    for name in ("classes.json", "normalization.json"):
        (folder / name).write_text((image_folder / name).read_text())
    csv_path = write_csv(folder, rows, header)
    with pytest.raises(StageError, match=message) as err:
        CsvImageDataset(csv_path, folder)
    assert str(csv_path) in str(err.value)


def test_duplicate_rows_are_refused(image_folder: Path) -> None:
    row = (image_folder / "test.csv").read_text().splitlines()[1]
    csv_path = write_csv(image_folder.parent, [row, row])
    with pytest.raises(StageError, match="custom.csv:3: duplicate row"):
        CsvImageDataset(csv_path, image_folder)
    head, name = row.split(",")[0].rsplit("/", 1)
    csv_path = write_csv(image_folder.parent, [row, f"{head}/./{name},0,x"])  # the same file, respelled
    with pytest.raises(StageError, match="custom.csv:3: duplicate row"):
        CsvImageDataset(csv_path, image_folder)


def test_missing_corrupt_or_wrongly_sized_images_are_named(image_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    (folder / "x").mkdir(parents=True)
    for name in ("classes.json", "normalization.json"):
        (folder / name).write_text((image_folder / name).read_text())
    (folder / "x" / "good.png").write_bytes((image_folder / "test.csv").parent.joinpath(
        (image_folder / "test.csv").read_text().splitlines()[1].split(",")[0]).read_bytes())
    (folder / "x" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    from PIL import Image
    Image.new("RGB", (16, 16)).save(folder / "x" / "small.png")
    for name, message in [("missing.png", "does not exist"), ("corrupt.png", "not a readable image"),
                          ("small.png", "image is 16x16, expected 32x32")]:
        csv_path = write_csv(folder, ["x/good.png,0,airplane", f"x/{name},0,airplane"])
        with pytest.raises(StageError, match=message) as err:
            decode_split(csv_path, folder, num_classes=10)
        assert name in str(err.value)
