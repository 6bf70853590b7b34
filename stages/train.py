"""train: data/images -> models/train/{model.pt,model.json}, metrics/train.json, DVCLive curves

usage: python -m stages.train IMAGES_DIR MODEL_DIR METRICS_JSON LIVE_DIR CHECKPOINT

Trains `train.arch` from scratch with the train section's recipe. A checkpoint is written
after every epoch; a rerun with the same params and data resumes from it.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from stages.devices import Ranks
from stages.loop import param_groups
from stages.model import AirbenchNet, build_model, init_whitening
from stages.outputs import stage_main
from stages.params import TrainParams, load_params
from stages.run import Outputs, load_data, run_stage, train_and_save

WHITENING_IMAGES = 5000  # airbench: enough patches for a stable 12x12 covariance


def train(images_dir: Path, outputs: Outputs, ranks: Ranks, device: torch.device, started: float, *,
          params: TrainParams, seed: int) -> dict:
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
    params = load_params()
    run_stage("train", __doc__, params.train,
              functools.partial(train, params=params.train, seed=params.seed))


if __name__ == "__main__":
    main()
