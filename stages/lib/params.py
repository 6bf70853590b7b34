"""Typed, strict loading of params.yaml: one frozen dataclass per stage section.

`dvc exp run -S train.lrr=0.1` or `-S train.lr=abc` is accepted by DVC and written into
params.yaml; these loaders refuse it before a stage writes anything.
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping

import yaml

from stages.lib.archs import registry
from stages.lib.datasets import DATASETS
from stages.lib.outputs import StageError

PARAMS_FILE = Path("params.yaml")
PRESETS = Path("presets")  # named recipes, e.g. presets/mnist_mlp.yaml (`make tutorial-NAME`)
# Mixed precision: auto = where the device computes it natively (devices.pick_precision);
# true / false force autocast on / off.
Amp = Literal["auto", True, False]
# Test-time augmentation levels, each adding views to the one before (loop.TTA_WEIGHTS); every
# list of them (train.tta's values, evaluate's metrics) is this one.
TTA_LEVELS = ("none", "flip", "flip_shift")
# download.dataset and train.arch: a name in a registry (datasets.DATASETS, archs.registry()),
# looked up when params are checked, so that a registered name is accepted wherever it is added
@dataclasses.dataclass(frozen=True, eq=False)
class Registered:
    """An Annotated mark: the value must be a key of what `registry()` returns (hashed by
    identity)."""
    registry: Callable[[], Mapping[str, object]]


DatasetName = Annotated[str, Registered(lambda: DATASETS)]
ArchName = Annotated[str, Registered(registry)]


class ParamsError(StageError):
    """A params.yaml value is unknown, missing, of the wrong type or out of range."""


@dataclasses.dataclass(frozen=True)
class DownloadParams:
    dataset: DatasetName
    # None: the dataset's official location; else a mirror (URL or local path). For `folder`:
    # the user's folder, or a .tar / .tar.gz / .zip of one (a path, file:// or http(s) URL)
    url: str | None
    # None: the official checksums (folder: none checked); else the tarball's md5, or
    # {file name: md5} for IDX files
    md5: str | dict[str, str] | None
    timeout: float  # seconds, for connecting and for each read
    retries: int  # further attempts after the first, with exponential back-off

    def check(self, section: str) -> None:
        digests = self.md5.values() if isinstance(self.md5, dict) else [self.md5] if self.md5 else []
        _require(all(len(d) == 32 and all(c in "0123456789abcdef" for c in d) for d in digests),
                 f"{section}.md5", "null, 32 lowercase hex digits, or a mapping of file names to "
                 "them", self.md5)
        _require(self.dataset != "folder" or not isinstance(self.md5, dict), f"{section}.md5",
                 "null or the archive's md5 with dataset folder", self.md5)
        _require(self.timeout > 0, f"{section}.timeout", "a number of seconds > 0", self.timeout)
        _require(0 <= self.retries <= 10, f"{section}.retries", "an integer in [0, 10]", self.retries)


@dataclasses.dataclass(frozen=True)
class PreprocessParams:
    val_fraction: float  # share of each class moved from the training batches to val
    seed: int  # draws the validation split
    workers: int  # processes encoding PNGs
    # class name -> share of its training images kept (an imbalanced split, for experiments
    # with class_weights / sampler); {} keeps everything
    keep: dict[str, float] = dataclasses.field(default_factory=dict)
    # share of each class held out for test when the source has no test split of its own
    test_fraction: float = 0.2
    # [height, width]: each image resized by its shorter side, then center-cropped to it;
    # None keeps the images' own size (they must then all share it)
    size: list[int] | None = None
    # 1 or 3; auto: 1 when every image is grayscale, else 3 (RGBA, palette, CMYK -> RGB)
    channels: Literal["auto", 1, 3] = "auto"

    def check(self, section: str) -> None:
        _require(0 <= self.val_fraction < 1, f"{section}.val_fraction", "a number in [0, 1)",
                 self.val_fraction)
        _require(0 < self.test_fraction < 1, f"{section}.test_fraction", "a number in (0, 1)",
                 self.test_fraction)
        _require(self.size is None or (len(self.size) == 2 and all(8 <= s <= 4096 for s in self.size)),
                 f"{section}.size", "null or [height, width], each 8 to 4096 pixels", self.size)
        _require(self.seed >= 0, f"{section}.seed", "an integer >= 0", self.seed)
        _require(self.workers >= 1, f"{section}.workers", "an integer >= 1", self.workers)
        for name, share in self.keep.items():
            _require(0 < share <= 1, f"{section}.keep.{name}", "a share in (0, 1]", share)


@dataclasses.dataclass(frozen=True)
class TrainParams:
    seed: int  # draws the initial weights, the batch order and the augmentations
    arch: ArchName
    epochs: float  # may be fractional, as airbench's 9.9: the last epoch stops early
    batch_size: int
    optimizer: Literal["sgd", "adam", "muon"]  # muon: conv filters by Muon, the rest by SGD
    lr: float  # per step for this batch_size
    momentum: float
    nesterov: bool
    muon_lr: float  # optimizer muon: the conv filters' step, relative to their norm (loop.Muon)
    muon_momentum: float
    weight_decay: float
    bias_lr_scale: float  # BatchNorm biases train with lr * this (airbench: 64)
    label_smoothing: float
    schedule: Literal["triangle", "cosine", "constant"]
    warmup: float  # share of steps spent ramping the lr up
    crop_padding: int  # pixels of reflect padding for random crops; 0 turns crops off
    # progressive resizing: the first epoch trains on images downscaled to this side length,
    # growing each epoch to the full size at `progressive_until` of the epochs; 0 turns it off
    progressive_from: int
    progressive_until: float
    # ... each epoch's side rounded to a multiple of this (1: any side). airbench's FLOPs rise
    # in steps, as its poolings' floors switch: a side of 4k + 1 costs up to a third more than
    # 4k, for one pixel more (docs/performance.md), so 4 keeps every epoch on a cheap side
    progressive_step: int
    # example selection: from this epoch on (0 = never) each epoch trains on the
    # `select_fraction` of the set with the highest loss when last seen (loop.Training)
    select_from: int
    select_fraction: float
    # progressive freezing: from this epoch on (0 = never) the architecture's first block
    # stops training, the next one an epoch later, up to `freeze_blocks` blocks; backward
    # skips them (loop.freeze_leading)
    freeze_from: int
    freeze_blocks: int
    flip: Literal["auto", True, False]  # auto: where the data set's classes survive a mirror
    ema_every: int  # steps between weight-averaging updates; 0 turns averaging off
    ema_start: float  # share of training before averaging starts
    whiten_bias_epochs: int  # airbench: train the whitening conv's bias this long, then freeze
    class_weights: Literal["none", "balanced"]  # balanced: the loss weighs rare classes up
    sampler: Literal["shuffle", "balanced"]  # balanced: batches draw every class equally often
    tta: Literal[("auto", *TTA_LEVELS)]  # views averaged when evaluating; auto: flip_shift
    # where a mirror keeps the class, else none
    device: Literal["auto", "cpu", "cuda", "mps"]
    amp: Amp
    compile: bool
    eval_every: int  # epochs between validation passes; 0 = only after the last epoch
    eval_batch_size: int
    workers: int  # threads loading batches ahead of the step when the data streams
    # auto, or a size such as 512MB or 2GiB: a training split whose in-memory copy would take
    # more streams from its pack instead (auto: half the device's free memory)
    memory_budget: str = "auto"

    def check(self, section: str) -> None:
        _require(self.seed >= 0, f"{section}.seed", "an integer >= 0", self.seed)
        _require(self.epochs > 0, f"{section}.epochs", "a number > 0", self.epochs)
        _require(self.batch_size >= 1, f"{section}.batch_size", "an integer >= 1", self.batch_size)
        _require(self.lr > 0, f"{section}.lr", "a number > 0", self.lr)
        _require(0 <= self.momentum < 1, f"{section}.momentum", "a number in [0, 1)", self.momentum)
        _require(self.weight_decay >= 0, f"{section}.weight_decay", "a number >= 0", self.weight_decay)
        _require(self.bias_lr_scale > 0, f"{section}.bias_lr_scale", "a number > 0", self.bias_lr_scale)
        _require(0 <= self.label_smoothing < 1, f"{section}.label_smoothing", "a number in [0, 1)",
                 self.label_smoothing)
        _require(0 <= self.warmup < 1, f"{section}.warmup", "a number in [0, 1)", self.warmup)
        _require(0 <= self.crop_padding <= 8, f"{section}.crop_padding", "an integer in [0, 8]",
                 self.crop_padding)
        _require(self.muon_lr > 0, f"{section}.muon_lr", "a number > 0", self.muon_lr)
        _require(0 <= self.muon_momentum < 1, f"{section}.muon_momentum", "a number in [0, 1)",
                 self.muon_momentum)
        self.check_cuts(section)
        _require(self.ema_every >= 0, f"{section}.ema_every", "an integer >= 0", self.ema_every)
        _require(0 <= self.ema_start < 1, f"{section}.ema_start", "a number in [0, 1)", self.ema_start)
        _require(self.whiten_bias_epochs >= 0, f"{section}.whiten_bias_epochs", "an integer >= 0",
                 self.whiten_bias_epochs)
        _require(self.eval_every >= 0, f"{section}.eval_every", "an integer >= 0", self.eval_every)
        _require(self.eval_batch_size >= 1, f"{section}.eval_batch_size", "an integer >= 1",
                 self.eval_batch_size)
        _require(self.workers >= 1, f"{section}.workers", "an integer >= 1", self.workers)
        _require(self.memory_budget == "auto" or parse_bytes(self.memory_budget) is not None,
                 f"{section}.memory_budget", "auto or a size such as 512MB or 2GiB",
                 self.memory_budget)
        _require(not (self.nesterov and self.optimizer == "sgd" and self.momentum == 0),
                 f"{section}.nesterov", "false when momentum is 0 (SGD requires it)", self.nesterov)

    def check_cuts(self, section: str) -> None:
        """The recipe cuts: progressive resizing, example selection, progressive freezing."""
        _require(self.progressive_from == 0 or self.progressive_from >= 16, f"{section}.progressive_from",
                 "0 (off) or a side length >= 16 pixels", self.progressive_from)
        _require(0 < self.progressive_until <= 1, f"{section}.progressive_until", "a share in (0, 1]",
                 self.progressive_until)
        _require(self.progressive_step >= 1 and self.progressive_from % self.progressive_step == 0,
                 f"{section}.progressive_step", "an integer >= 1 dividing progressive_from",
                 self.progressive_step)
        _require(self.select_from >= 0, f"{section}.select_from", "an epoch >= 0 (0: off)",
                 self.select_from)
        _require(0 < self.select_fraction <= 1, f"{section}.select_fraction", "a share in (0, 1]",
                 self.select_fraction)
        _require(self.select_from == 0 or self.sampler == "shuffle", f"{section}.select_from",
                 "0 with sampler balanced (its draws ignore the selection)", self.select_from)
        _require(self.freeze_from >= 0, f"{section}.freeze_from", "an epoch >= 0 (0: off)",
                 self.freeze_from)
        _require(self.freeze_blocks >= 1, f"{section}.freeze_blocks", "an integer >= 1",
                 self.freeze_blocks)
        problems = arch_problems(self, section)
        if problems:
            presets = [p for p in sorted(PRESETS.glob("*.yaml"))
                       if read_yaml(p).get("train", {}).get("arch") == self.arch]
            advice = "".join(f"; {p} sets them: `make tutorial-{p.stem}`" for p in presets)
            raise ParamsError(f"params: {section}.arch {self.arch} does not suit "
                              f"{'; '.join(problems)} (fix them in params.yaml or with "
                              f"`dvc exp run -S`){advice}")


def arch_problems(params: TrainParams, section: str) -> list[str]:
    """The recipe cuts `params` turns on that its architecture cannot take, each with its fix."""
    arch = registry()[params.arch]
    problems = []
    if params.progressive_from and not arch.any_size:
        problems.append(f"{section}.progressive_from {params.progressive_from}: set it to 0 "
                        f"({params.arch} takes only the size it was built for)")
    if params.freeze_from and not arch.blocks:
        problems.append(f"{section}.freeze_from {params.freeze_from}: set it to 0 ({params.arch} "
                        "has no blocks to freeze)")
    elif params.freeze_from and params.freeze_blocks > len(arch.blocks):
        problems.append(f"{section}.freeze_from {params.freeze_from}: set it to 0, or "
                        f"{section}.freeze_blocks to at most {len(arch.blocks)} ({params.arch} "
                        f"has {len(arch.blocks)} blocks ({', '.join(arch.blocks)}) to freeze)")
    return problems


@dataclasses.dataclass(frozen=True)
class FinetuneParams:
    """Finetune runs train's loop; the loop knobs not listed here come from the train section."""
    init: str  # state_dict file to start from; also a dep of the stage in dvc.yaml
    # only for a bare state_dict: a model this project saved names its arch in its model.json
    arch: ArchName | None
    epochs: float
    batch_size: int
    lr: float  # backbone learning rate
    head_lr: float  # classifier head learning rate
    freeze_epochs: int  # epochs that train only the head

    def check(self, section: str) -> None:
        _require(self.init != "", f"{section}.init", "a path to a state_dict file", self.init)
        _require(self.epochs > 0, f"{section}.epochs", "a number > 0", self.epochs)
        _require(self.batch_size >= 1, f"{section}.batch_size", "an integer >= 1", self.batch_size)
        _require(self.lr > 0, f"{section}.lr", "a number > 0", self.lr)
        _require(self.head_lr > 0, f"{section}.head_lr", "a number > 0", self.head_lr)
        _require(0 <= self.freeze_epochs < self.epochs, f"{section}.freeze_epochs",
                 f"an integer in [0, {section}.epochs)", self.freeze_epochs)


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    batch_size: int
    device: Literal["auto", "cpu", "cuda", "mps"]
    amp: Amp
    misclassified: int  # how many wrong test images the grid shows

    def check(self, section: str) -> None:
        _require(self.batch_size >= 1, f"{section}.batch_size", "an integer >= 1", self.batch_size)
        _require(0 <= self.misclassified <= 400, f"{section}.misclassified", "an integer in [0, 400]",
                 self.misclassified)


@dataclasses.dataclass(frozen=True)
class Params:
    """The whole of params.yaml: one section per stage (each seed lives where it is drawn)."""
    download: DownloadParams
    preprocess: PreprocessParams
    train: TrainParams
    finetune: FinetuneParams
    evaluate: EvaluateParams

    def check(self, section: str) -> None:
        """Each section has checked itself."""


UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
         "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: str) -> int | None:
    """A size such as 512MB, 1.5GiB or 4096 (bytes); None if it is none."""
    number = text.strip().rstrip("BbIiKkMmGgTt ")
    unit = text.strip()[len(number):].strip().lower()
    try:
        value = float(number)
    except ValueError:
        return None
    if unit not in UNITS or not value > 0 or value == float("inf"):
        return None
    return int(value * UNITS[unit])


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and check the whole file, so a typo anywhere stops every stage; train's `auto`
    augmentations resolved for the data set."""
    params = build(Params, read_yaml(path), "")
    return dataclasses.replace(params, train=for_dataset(params.train, params.download.dataset))


def for_dataset(train: TrainParams, dataset: str) -> TrainParams:
    """`train` with its `auto` augmentations resolved for `dataset`: flips, and flip TTA
    views, where a mirror keeps the class."""
    flips = DATASETS[dataset].flips
    return dataclasses.replace(
        train, flip=flips if train.flip == "auto" else train.flip,
        tta=("flip_shift" if flips else "none") if train.tta == "auto" else train.tta)


def preflight(name: str, usage: str | None) -> None:
    """Called by each stage module before its other imports. Run as a program (`name` is
    "__main__"), `-h`/`--help` prints the stage's usage and exits 0, and any params.yaml problem
    stops it with one `error:` line, both before torch is imported or data is read."""
    if name != "__main__":
        return
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(usage)
        raise SystemExit(0)
    try:
        load_params()
    except StageError as err:
        raise SystemExit(f"error: {err}") from None


def read_yaml(path: Path) -> dict:

    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run the stage from the project root") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, found {type(raw).__name__}")
    return raw


def build(cls: type, raw: object, section: str) -> Any:
    """Build dataclass `cls` from `raw`, checking keys, types and ranges; names keys in full."""
    if not isinstance(raw, dict):
        raise ParamsError(f"params: {section} must be a mapping of keys, found {raw!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    full = {name: f"{section}.{name}" if section else name for name in names}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        found = [f"{section}.{k}" if section else str(k) for k in unknown]
        guesses = [g for g in (closest(str(k), section, names) for k in unknown) if g]
        hint = f"did you mean {', '.join(guesses)}? " if guesses else ""
        raise ParamsError(f"params: unknown key(s) {found} (a typo in params.yaml or in "
                          f"`dvc exp run -S`?); {hint}expected {list(full.values())}")
    missing = [full[k] for k in names if k not in raw]
    if missing:
        raise ParamsError(f"params: missing key(s) {missing}; see docs/params.md")
    values = {name: _convert(hints[name], raw[name], full[name]) for name in names}
    params = cls(**values)
    params.check(section)
    return params


def closest(key: str, section: str, names: list[str]) -> str | None:
    """The known key, in full, closest to an unknown one (None: none is close)."""
    close = difflib.get_close_matches(key, names, n=1)
    return (f"{section}.{close[0]}" if section else close[0]) if close else None


def _convert(hint: Any, value: object, key: str) -> object:
    if typing.get_origin(hint) is Annotated:  # a name in the registry it is annotated with
        registry = hint.__metadata__[0].registry()
        _require(type(value) is str and value in registry, key, f"one of {list(registry)}", value)
        return value
    options = typing.get_args(hint)
    if type(None) in options:  # X | None, or X | Y | None
        if value is None:
            return None
        rest = [o for o in options if o is not type(None)]
        # a union of a plain type and a mapping: the value's own shape picks the branch
        mapping = next((o for o in rest if typing.get_origin(o) is dict), None)
        plain = next((o for o in rest if typing.get_origin(o) is not dict), mapping)
        return _convert(mapping if isinstance(value, dict) and mapping else plain, value, key)
    if typing.get_origin(hint) is list:  # list[int]: a short list of integers
        _require(isinstance(value, list) and all(type(v) is int for v in value), key,
                 "a list of integers", value)
        return value
    if typing.get_origin(hint) is dict:  # dict[str, X]: a mapping of names to X
        _require(isinstance(value, dict) and all(type(k) is str for k in value), key,
                 "a mapping of names to values", value)
        value_type = typing.get_args(hint)[1]
        return {k: _convert(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        # by type too: YAML's 1 is not true, nor 0 false
        _require(any(type(value) is type(c) and value == c for c in choices), key,
                 f"one of {[yaml_text(c) for c in choices]}", value)
        return value
    return _convert_scalar(hint, value, key)


def _convert_scalar(hint: Any, value: object, key: str) -> object:
    if hint is bool:
        _require(type(value) is bool, key, "true or false", value)
    elif hint is int:
        _require(type(value) is int, key, "an integer", value)
    elif hint is float:
        # YAML reads 1e-3 as a string; accept it when it parses as a number, refuse anything else.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        _require(type(value) in (int, float), key, "a number", value)
        _require(value == value and abs(value) != float("inf"), key, "a finite number", value)
        return float(value)
    elif hint is str:
        _require(type(value) is str, key, "a string", value)
    else:
        raise AssertionError(f"unsupported param type {hint} for {key}")
    return value


def yaml_text(value: object) -> str:
    """A choice as it is written in params.yaml (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _require(ok: bool, key: str, expected: str, found: object) -> None:
    if not ok:
        raise ParamsError(f"params: {key} must be {expected}, found {found!r} "
                          f"(fix it in params.yaml or in `dvc exp run -S {key}=...`)")


LOCATION = ("url", "md5")  # download's keys that locate the data set's files


def preset_overrides(preset: Path, base: Path, workspace: Path = PARAMS_FILE) -> list[str]:
    """`dvc exp run -S` arguments that turn `workspace` into `base` with a preset applied (a
    YAML file of sections and keys, e.g. presets/mnist_mlp.yaml), checked to load first. Keys
    that `workspace` holds differently from `base` are reset too: `dvc exp run` leaves the
    last experiment's values in params.yaml, and a preset is defined on the committed file.
    Not download.url and .md5 while the workspace names the preset's data set: they say where
    this machine gets it (`make local-data`), not how the recipe trains."""
    overrides = read_yaml(preset)
    target = with_preset(preset, base)
    current = read_yaml(workspace)
    here, wanted = current.get("download", {}), target["download"]
    if here.get("dataset") == wanted["dataset"]:  # where this machine gets that data set stays
        for key in LOCATION:
            if key not in overrides.get("download", {}) and key in here:
                wanted[key] = here[key]
    return [f"{section}.{key}={override_text(value)}"
            for section, keys in target.items() for key, value in keys.items()
            if key in overrides.get(section, {}) or current.get(section, {}).get(key) != value]


def with_preset(preset: Path, base: Path) -> dict:
    """params.yaml `base` with a preset's keys applied, as a mapping; checked to load."""
    target = read_yaml(base)
    for section, keys in read_yaml(preset).items():
        if not isinstance(keys, dict) or not isinstance(target.get(section), dict):
            raise ParamsError(f"{preset}: {section!r} must be a section of params.yaml holding keys")
        target[section] = {**target[section], **keys}
    build(Params, target, "")
    return target


def override_text(value: object) -> str:
    """A value as `dvc exp run -S` parses it (YAML)."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {override_text(v)}" for k, v in value.items()) + "}"
    return yaml_text(value)


if __name__ == "__main__":  # python -m stages.lib.params PRESET BASE: `-S` and its value, one a line
    try:
        print("\n".join(f"-S\n{item}" for item in preset_overrides(Path(sys.argv[1]), Path(sys.argv[2]))))
    except StageError as err:
        raise SystemExit(f"error: {err}") from None
