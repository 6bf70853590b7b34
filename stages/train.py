"""train: data/images -> models/train/{model.pt,model.json}, metrics/train.json, DVCLive curves

usage: python -m stages.train IMAGES_DIR MODEL_DIR METRICS_JSON LIVE_DIR CHECKPOINT

Trains `train.arch` from scratch with the train section's recipe. A checkpoint is written
after every epoch; a rerun with the same params and data resumes from it.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from stages.data import load_data
from stages.devices import Precision, Ranks, Stopwatch
from stages.loop import scratch_groups
from stages.model import fresh_model
from stages.outputs import stage_main
from stages.params import TrainParams, load_params
from stages.run import Outputs, run_stage, train_and_save


def train(images_dir: Path, outputs: Outputs, ranks: Ranks, device: torch.device,
          precision: Precision, watch: Stopwatch, *, params: TrainParams) -> dict:
    torch.manual_seed(params.seed)
    data = load_data(images_dir, device, params.workers)
    with watch.section():  # the whitening is part of the training time, as airbench counts it
        model = fresh_model(params.arch, len(data.classes), data.train_images)
    return train_and_save(model, scratch_groups(model, params), params, data, device, precision,
                          ranks, outputs, watch, recorded={}, report={})


@stage_main
def main() -> None:
    params = load_params()
    run_stage("train", __doc__, params.train,
              functools.partial(train, params=params.train))


if __name__ == "__main__":
    main()
