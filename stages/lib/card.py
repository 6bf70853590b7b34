"""A saved model: its weights (model.pt, a plain state_dict) and its card (model.json: the
architecture, classes, normalization, input size, params and metrics it was trained with),
written together and read back checked."""
from __future__ import annotations

import dataclasses
import io
import json
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from stages.lib.archs import registry
from stages.lib.folder import MODES
from stages.lib.nets import Architecture, build_model
from stages.lib.outputs import StageError, atomic_dir
from stages.lib.params import TTA_LEVELS


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """model.json, the sidecar of every saved model.pt: what it is and how to feed it. Read and
    written here only. The channel count is the normalization's length."""
    arch: str
    classes: list[str]
    normalization: dict[str, list[float]]  # per-channel mean and std, in [0, 1] units
    input_size: list[int]  # [height, width]
    params: dict  # the stage's params, and what it recorded beside them
    metrics: dict  # validation figures (no timings: the same weights make the same file)
    hardware: dict  # device and precision it trained with

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.normalization["mean"]), *self.input_size)

    @property
    def tta_levels(self) -> list[str]:
        """The test-time augmentations that suit the model's data: plain, and each level up to
        the one its training validated with (train.tta: none for digits)."""
        if "tta" not in self.params:
            raise StageError("model.json records no params.tta (the TTA its training validated "
                             "with): not a model the train or finetune stage saved; retrain it")
        return list(TTA_LEVELS[:TTA_LEVELS.index(self.params["tta"]) + 1])

    @classmethod
    def read(cls, model_dir: Path) -> ModelCard:
        path = model_dir / "model.json"
        if not path.is_file():
            raise StageError(not_a_model_folder(model_dir))
        try:
            card = cls(**json.loads(path.read_text()))
            card.check()
        except (OSError, json.JSONDecodeError, TypeError, ValueError, KeyError) as err:
            raise StageError(f"{path}: cannot read the model's sidecar ({err}); rerun the stage "
                             "that wrote it") from None
        return card

    def check(self) -> None:
        if self.arch not in registry():
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {list(registry())}")
        if not self.classes or not all(isinstance(c, str) for c in self.classes):
            raise ValueError(f"classes must be a list of names, found {self.classes}")
        if len(self.input_size) != 2 or not all(isinstance(n, int) and n > 0 for n in self.input_size):
            raise ValueError(f"input_size must be [height, width], found {self.input_size}")
        if "tta" in self.params and self.params["tta"] not in TTA_LEVELS:
            raise ValueError(f"params.tta must be one of {list(TTA_LEVELS)}, found {self.params.get('tta')!r}")
        mean, std = self.normalization["mean"], self.normalization["std"]
        if len(mean) not in MODES or len(std) != len(mean):
            raise ValueError(f"normalization must give 1 or 3 means and stds, found {self.normalization}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


def torch_bytes(obj: object) -> bytes:
    """torch.save into memory: written by Python, a full disk raises a plain OSError (torch's
    own file writer reports it as an opaque RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_model(model: nn.Module, model_dir: Path, card: ModelCard) -> None:
    """model.pt (a plain state_dict on the CPU) and model.json (its card), written together as
    one directory."""
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(model_dir) as tmp:
        (tmp / "model.pt").write_bytes(torch_bytes(state_dict))
        (tmp / "model.json").write_text(card.to_json())


def load_weights(path: Path, map_location: str | torch.device = "cpu") -> object:
    """torch.load restricted to tensors and plain containers (weights_only=True): a file that
    carries code is refused, never run. Every failure names the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise StageError(f"{path}: does not exist") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError,
            zipfile.BadZipFile) as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        reason = next((ln.strip() for ln in lines if "WeightsUnpickler error" in ln), lines[0])
        raise StageError(f"{path}: not a loadable weights-only torch file ({reason}); it is "
                         "truncated, not a torch file, or holds code, which is never run") from None


def not_a_model_folder(path: Path) -> str:
    """Why `path`, given as a model's folder, is none: what it is, and what one holds."""
    expected = ("a model folder holds model.pt (a state_dict) beside model.json, as "
                "models/train and models/finetune do")
    if not path.exists():
        return f"{path}: no such file or folder; {expected}"
    if (path / "model.pt2").is_file():
        return (f"{path}: holds an exported program (model.pt2: load it with "
                f"torch.export.load), not a saved model; {expected}")
    if not path.is_dir():
        return f"{path}: a file, not a model folder; {expected}"
    return f"{path}: not a model folder (it holds {sorted(p.name for p in path.iterdir())[:8]}); {expected}"


def model_dir_of(path: str | Path) -> Path:
    """A model's folder, given the folder or the model.pt inside it (both read naturally on
    a command line)."""
    path = Path(path)
    return path.parent if path.name == "model.pt" and path.is_file() else path


def load_trained(model_dir: Path) -> tuple[Architecture, ModelCard]:
    """Rebuild a saved model on the CPU from its directory; returns (model, card)."""
    card = ModelCard.read(model_dir)
    model = build_model(card.arch, len(card.classes), card.shape)
    state_dict = load_weights(model_dir / "model.pt")
    try:
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise StageError(f"{model_dir / 'model.pt'}: cannot load it as a {card.arch} state_dict for "
                         f"{len(card.classes)} classes ({str(err).splitlines()[0]})") from None
    return model.eval(), card
