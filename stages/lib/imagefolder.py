"""A person's own images, as extract left them: found, listed and checked for preprocess.

Two layouts, under the extracted folder or the one folder it holds:
- ImageFolder: `<class>/<image>`, or `train/<class>/<image>` with an optional
  `test/<class>/<image>` beside it; images may sit in sub-folders of their class folder.
- CSV: one `*.csv` (or `train.csv` and `test.csv`) whose columns include `path` and `label`
  or `class_name` (both: they must agree), paths relative to the CSV's folder.

Files are images by extension. Other files (a README, .DS_Store, thumbnails.db) are skipped
and counted; hidden files and folders too. An image that is empty, or a CSV row naming a
missing file or an unknown class, is refused naming it. Class names become folder names:
characters outside [A-Za-z0-9_-] turn into `_`.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from stages.lib.outputs import StageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif",
                    ".tiff", ".webp")
SPLITS = ("train", "test")
UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
MAX_CLASS_NAME = 64


@dataclass
class Listing:
    """The images found: per split, (file, class index) pairs in a stable order; the class
    names (folder-safe) in label order; the files skipped as not images."""
    classes: list[str]
    splits: dict[str, list[tuple[Path, int]]]
    skipped: list[Path] = field(default_factory=list)


def safe_name(name: str, where: str) -> str:
    safe = UNSAFE.sub("_", name.strip())[:MAX_CLASS_NAME]
    if not safe.strip("_"):
        raise StageError(f"{where}: class name {name!r} has no letter or digit to name a folder by")
    return safe


def safe_classes(names: list[str], where: str) -> list[str]:
    """Folder-safe names, one for one; two names that become the same are refused."""
    safe = [safe_name(n, where) for n in names]
    for i, name in enumerate(safe):
        if safe.index(name) != i:
            raise StageError(f"{where}: classes {names[safe.index(name)]!r} and {names[i]!r} both "
                             f"become folder {name!r}; rename one")
    return safe


def hidden(path: Path) -> bool:
    return path.name.startswith(".")


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def checked_image(path: Path) -> Path:
    if path.stat().st_size == 0:
        raise StageError(f"{path}: empty (0 bytes); delete it or replace it with the image")
    return path


def find_root(folder: Path) -> Path:
    """The folder itself, or the single folder it holds (an archive of `photos/...`)."""
    root = folder
    while True:
        entries = [e for e in root.iterdir() if not hidden(e)]
        if len(entries) != 1 or not entries[0].is_dir() or entries[0].name in SPLITS:
            return root
        root = entries[0]


def list_folder(folder: Path) -> Listing:
    """The images under `folder`, in whichever layout it holds."""
    root = find_root(folder)
    csvs = sorted(p for p in root.iterdir() if p.suffix.lower() == ".csv" and not hidden(p))
    if csvs:
        return list_csvs(root, csvs)
    if (root / "train").is_dir():
        return list_split_folders(root)
    listing = Listing([], {})
    classes = class_folders(root, listing)
    listing.classes = safe_classes([c.name for c in classes], str(root))
    listing.splits["train"] = images_of(classes, root, listing)
    return listing


def class_folders(split_dir: Path, listing: Listing) -> list[Path]:
    """The class folders of a split folder; files beside them are skipped, or refused if images."""
    folders = []
    for entry in sorted(split_dir.iterdir()):
        if hidden(entry):
            continue
        if entry.is_dir():
            folders.append(entry)
        elif is_image(entry):
            raise StageError(f"{entry}: an image outside any class folder; expected "
                             f"{split_dir}/<class>/<image>")
        else:
            listing.skipped.append(entry)
    if len(folders) < 2:
        raise StageError(f"{split_dir}: found {len(folders)} class folder(s); expected at least "
                         "2, as <class>/<image> (or a CSV of path,label)")
    return folders


def images_of(folders: list[Path], where: Path, listing: Listing,
              labels: dict[str, int] | None = None) -> list[tuple[Path, int]]:
    """Every image under each class folder (recursively, sorted), with its class index."""
    found = []
    for index, folder in enumerate(folders):
        label = index if labels is None else labels.get(folder.name)
        if label is None:
            raise StageError(f"{folder}: class {folder.name!r} is not among the training classes "
                             f"{sorted(labels or {})}; rename or remove it")
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        images = [p for p in files if not any(hidden(Path(q)) for q in p.relative_to(folder).parts)]
        listing.skipped.extend(p for p in images if not is_image(p))
        images = [checked_image(p) for p in images if is_image(p)]
        if not images and labels is None:
            raise StageError(f"{folder}: class folder holds no image ({', '.join(IMAGE_EXTENSIONS)}); "
                             "add images or remove the folder")
        found.extend((p, label) for p in images)
    return found


def list_split_folders(root: Path) -> Listing:
    """train/<class>/... and, if present, test/<class>/... ."""
    extra = sorted(e.name for e in root.iterdir() if e.is_dir() and not hidden(e) and e.name not in SPLITS)
    if extra:
        raise StageError(f"{root}: unexpected folder(s) {extra} beside train/; expected train/ and "
                         "an optional test/, each holding <class>/<image>")
    listing = Listing([], {})
    train = class_folders(root / "train", listing)
    names = [c.name for c in train]
    listing.classes = safe_classes(names, str(root / "train"))
    listing.splits["train"] = images_of(train, root / "train", listing)
    if (root / "test").is_dir():
        test = class_folders(root / "test", listing)
        labels = {name: index for index, name in enumerate(names)}
        listing.splits["test"] = images_of(test, root / "test", listing, labels)
    return listing


def list_csvs(root: Path, csvs: list[Path]) -> Listing:
    """One CSV (a single split), or train.csv and test.csv."""
    names = {p.name.lower(): p for p in csvs}
    if len(csvs) > 1 and set(names) != {"train.csv", "test.csv"}:
        raise StageError(f"{root}: found CSVs {[p.name for p in csvs]}; expected one, or "
                         "train.csv and test.csv")
    tables = {"train": read_table(csvs[0])} if len(csvs) == 1 else {
        split: read_table(names[f"{split}.csv"]) for split in SPLITS}
    train_names = sorted({name for _, name in tables["train"]}, key=class_order)
    listing = Listing(safe_classes(train_names, str(csvs[0])), {})
    index = {name: i for i, name in enumerate(train_names)}
    for split, rows in tables.items():
        where = names.get(f"{split}.csv", csvs[0])
        listing.splits[split] = [(path, class_index(index, name, where, path)) for path, name in rows]
    if len(train_names) < 2:
        raise StageError(f"{csvs[0]}: names {len(train_names)} class(es); expected at least 2")
    return listing


def class_order(name: str) -> tuple[int, int | str]:
    """Numeric labels in numeric order (2 before 10), names alphabetically."""
    return (0, int(name)) if name.isdigit() else (1, name)


def class_index(index: dict[str, int], name: str, where: Path, path: Path) -> int:
    if name not in index:
        raise StageError(f"{where}: the row for {path.name} names class {name!r}, not among the "
                         f"training classes {list(index)}")
    return index[name]


def read_table(path: Path) -> list[tuple[Path, str]]:
    """(image file, class name) per row of a CSV with path and label and/or class_name."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "path" not in columns or not {"label", "class_name"} & set(columns):
            raise StageError(f"{path}: columns {columns}; expected path and label or class_name")
        rows = [row_of(path, line, row) for line, row in enumerate(reader, start=2)]
    if not rows:
        raise StageError(f"{path}: no rows")
    seen: set[Path] = set()
    for image, _ in rows:
        if image in seen:
            raise StageError(f"{path}: {image} is listed twice")
        seen.add(image)
    return rows


def row_of(path: Path, line: int, row: dict[str, str]) -> tuple[Path, str]:
    where = f"{path}:{line}"
    rel, label, name = row.get("path") or "", row.get("label"), row.get("class_name")
    if label is not None and name is not None and label.strip() != name.strip() and not label.strip().isdigit():
        raise StageError(f"{where}: label {label!r} and class_name {name!r} disagree")
    class_name = (name if name is not None else label or "").strip()
    if not class_name:
        raise StageError(f"{where}: no class given for {rel!r}")
    image = (path.parent / rel).resolve()
    if not rel or Path(rel).is_absolute() or not image.is_relative_to(path.parent.resolve()):
        raise StageError(f"{where}: path {rel!r} is outside the CSV's folder {path.parent}")
    if not image.is_file():
        raise StageError(f"{where}: image {rel!r} does not exist ({image})")
    if not is_image(image):
        raise StageError(f"{where}: {rel!r} is not an image file ({', '.join(IMAGE_EXTENSIONS)})")
    return checked_image(image), class_name
