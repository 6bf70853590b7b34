"""finetune: a state_dict file + data/packed -> models/finetune/{model.pt,model.json},
metrics/finetune.json, DVCLive curves

usage: python -m stages.finetune PACKED_DIR MODEL_DIR METRICS_JSON LIVE_DIR CHECKPOINT

Starts from `finetune.init` (the train stage's model, or a user's file such as torchvision's
ImageNet ResNet-18 weights) and runs train's loop with per-group learning rates: the head at
`finetune.head_lr`, the backbone at `finetune.lr` after `finetune.freeze_epochs` head-only
epochs. Keys are matched by name and shape; the report of what loaded is printed and saved.
With `train.optimizer: muon` every group steps by SGD (lr and head_lr are SGD rates): Muon's
fixed-size steps are for training from scratch. Progressive resizing is for training from
scratch too: finetune trains at the images' size throughout.
"""
from __future__ import annotations

from stages.lib.params import preflight

preflight(__name__, __doc__)  # --help, and bad params.yaml, answered before the slow imports

import dataclasses
import hashlib
from pathlib import Path

import torch

from stages.lib.card import ModelCard, load_weights
from stages.lib.data import Data, load_data
from stages.lib.devices import memory_budget
from stages.lib.harness import (epoch_logger, final_metrics, fingerprint, print_summary,
                                save_trained, stage_paths, training_env)
from stages.lib.loop import Checkpoint, Env, Training, fit, training_loader
from stages.lib.nets import Architecture, build_model
from stages.lib.optim import Rates, param_groups
from stages.lib.outputs import StageError, stage_main
from stages.lib.params import Params, TrainParams, load_params

PREFIXES = ("module.", "_orig_mod.")  # added by DataParallel/DDP and by torch.compile


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state_dict safely (weights_only) and strip wrapper prefixes from its keys."""
    if not path.is_file():
        raise StageError(f"finetune.init: {path} does not exist; run `dvc repro train` or "
                         "point finetune.init at a state_dict file")
    try:
        state = load_weights(path)
    except StageError as err:
        raise StageError(f"finetune.init: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StageError(f"finetune.init: {path} must hold a dict of tensors (a state_dict), "
                         f"found {type(state).__name__}")
    return {strip_prefixes(str(k)): v for k, v in state.items()}


def strip_prefixes(key: str) -> str:
    while key.startswith(PREFIXES):
        key = key.split(".", 1)[1]
    return key


def match_weights(model: Architecture, loaded: dict[str, torch.Tensor], path: Path) -> dict[str, list[str]]:
    """Copy every backbone tensor from `loaded` into `model`; only the head and, when its
    shape differs, the stem may stay freshly initialised. Returns the report."""
    head, stems = model.HEAD, model.STEM
    own = model.state_dict()
    report: dict[str, list[str]] = {"loaded": [], "skipped": [], "reinitialised": []}
    for key, target in own.items():
        source = loaded.get(key)
        if source is not None and source.shape == target.shape:
            if source.is_floating_point() and not torch.isfinite(source).all():
                raise StageError(f"finetune.init: {path}: {key} holds NaN or inf values")
            report["loaded"].append(key)
        elif key.startswith(head) or (key in stems and source is not None):
            report["reinitialised"].append(key)
        elif source is None:
            raise StageError(f"finetune.init: {path} lacks backbone key {key!r} of "
                             f"{type(model).__name__}; is finetune.arch the architecture it was saved from?")
        else:
            raise StageError(f"finetune.init: {path}: {key} has shape {tuple(source.shape)}, the "
                             f"model needs {tuple(target.shape)}; only the classifier head may differ")
    report["skipped"] = sorted(set(loaded) - set(report["loaded"]))
    if not report["loaded"]:
        raise StageError(f"finetune.init: {path}: no key matches {type(model).__name__}")
    model.load_state_dict({**own, **{k: loaded[k] for k in report["loaded"]}}, strict=True)
    return report


def init_arch(init: Path, arch: str | None) -> str:
    """The architecture to build: from the model.json beside `init` when there is one (a model
    this project saved), else `finetune.arch`, which a bare state_dict needs."""
    sidecar = init.parent / "model.json"
    if not sidecar.is_file():
        if arch is None:
            raise StageError(f"finetune.init: {init} has no model.json beside it to name its "
                             "architecture; set finetune.arch to the one it was saved from")
        return arch
    saved = ModelCard.read(init.parent).arch
    if arch is not None and arch != saved:
        raise StageError(f"finetune.arch is {arch!r} but {sidecar} says {init} is a {saved!r}; set "
                         "finetune.arch to null (it is read from model.json)")
    return saved


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def loop_params(params: Params) -> TrainParams:
    """Finetune runs train's loop: the train section's knobs (its seed too), with finetune's
    own architecture (read from init's model.json), length, batch size and backbone lr, at
    full size, on every example and every layer (no progressive resizing, example selection or
    freezing: the network has learnt its features already, finetune's losses would start
    unknown, and its own freeze_epochs say what waits)."""
    tune = params.finetune
    return dataclasses.replace(params.train, arch=init_arch(Path(tune.init), tune.arch),
                               epochs=tune.epochs, batch_size=tune.batch_size, lr=tune.lr,
                               progressive_from=0, select_from=0, freeze_from=0)


def pretrained_model(arch: str, data: Data, init: Path, env: Env) -> tuple[Architecture, dict]:
    """`arch` for the data's classes and shape, with `init`'s weights where name and shape
    match (the report says which loaded, were re-initialised or skipped), on the device."""
    loaded = read_state_dict(init)
    model = build_model(arch, len(data.classes), tuple(data.train_images.shape[1:]))
    report = match_weights(model, loaded, init)
    if env.ranks.main:
        print(f"finetune: from {init}: loaded {len(report['loaded'])} keys, re-initialised "
              f"{report['reinitialised']}, skipped {report['skipped']}")
    return model.to(env.device, memory_format=torch.channels_last), report


@stage_main
def main() -> None:
    all_params = load_params()
    tune, params = all_params.finetune, loop_params(all_params)
    packed_dir, outputs = stage_paths(__doc__)
    with training_env(params) as env:  # torchrun's ranks, the device and precision, the clock
        torch.manual_seed(params.seed)
        data = load_data(packed_dir, env.device, memory_budget(params.memory_budget, env.device))
        model, report = pretrained_model(params.arch, data, Path(tune.init), env)
        rates = Rates(tune.lr, tune.head_lr, params.weight_decay, params.bias_lr_scale,
                      freeze_epochs=tune.freeze_epochs)
        loader = training_loader(params, data.train_images, data.train_labels, params.seed, env.ranks)
        training = Training(model, param_groups(model, rates), params, loader, env)
        recorded = {"init": tune.init, "init_sha256": sha256_of(Path(tune.init)),
                    "head_lr": tune.head_lr, "freeze_epochs": tune.freeze_epochs}
        checkpoint = Checkpoint(outputs.checkpoint, fingerprint(params, data, env, recorded))
        with epoch_logger(outputs.live_dir, training) as log_epoch:
            fit(training, data.val, checkpoint, log_epoch)
        if env.ranks.main:
            metrics = final_metrics(training, data)
            counts = {f"init_keys_{k}": len(v) for k, v in report.items()}
            save_trained(training, data, outputs, metrics, recorded, {**counts, "init_report": report})
            print_summary("finetune", metrics)


if __name__ == "__main__":
    main()
