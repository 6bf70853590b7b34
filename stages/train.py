"""train: data/images -> models/train/{model.pt,model.json}, metrics/train.json, DVCLive curves

usage: python -m stages.train IMAGES_DIR MODEL_DIR METRICS_JSON LIVE_DIR CHECKPOINT

Trains `train.arch` from scratch with the train section's recipe. A checkpoint is written
after every epoch; a rerun with the same params and data resumes from it.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from stages.devices import Ranks, start, stop
from stages.loop import param_groups
from stages.model import AirbenchNet, build_model, init_whitening
from stages.outputs import stage_main
from stages.params import TrainParams, load_params
from stages.run import Outputs, load_data, train_and_save

WHITENING_IMAGES = 5000  # airbench: enough patches for a stable 12x12 covariance


def train(images_dir: Path, params: TrainParams, seed: int, ranks: Ranks, device: torch.device,
          outputs: Outputs, started: float) -> dict:
    torch.manual_seed(seed)
    data = load_data(images_dir, device, params.workers)
    model = build_model(params.arch, len(data.classes)).to(device, memory_format=torch.channels_last)
    if isinstance(model, AirbenchNet):
        init_whitening(model.whiten, data.train_images[:WHITENING_IMAGES])
    groups = param_groups(model, model.HEAD, params.lr, params.lr, params.weight_decay,
                          params.bias_lr_scale, freeze_epochs=0,
                          whiten_bias_epochs=params.whiten_bias_epochs)
    return train_and_save(model, groups, params, data, seed, device, ranks, outputs, started,
                          recorded={}, report={})


@stage_main
def main() -> None:
    if len(sys.argv) != 6:
        raise SystemExit(__doc__)
    started = time.perf_counter()
    images_dir, model_dir, metrics_path, live_dir, checkpoint = map(Path, sys.argv[1:])
    all_params = load_params()
    params, seed = all_params.train, all_params.seed
    ranks, device = start(params.device, params.batch_size)
    try:
        metrics = train(images_dir, params, seed, ranks, device,
                        Outputs(model_dir, metrics_path, live_dir, checkpoint), started)
    finally:
        stop()
    if ranks.main:
        print("train: " + ", ".join(f"{k} {v}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
