"""train: data/images -> models/train/{model.pt,model.json}, metrics/train.json, DVCLive curves

usage: python -m stages.train PACKED_DIR MODEL_DIR METRICS_JSON LIVE_DIR CHECKPOINT

Trains `train.arch` from scratch with the train section's recipe. A checkpoint is written
after every epoch; a rerun with the same params and data resumes from it.
"""
from __future__ import annotations

import torch

from stages.lib.data import load_data
from stages.lib.devices import memory_budget
from stages.lib.nets import fresh_model
from stages.lib.optim import scratch_groups
from stages.lib.outputs import stage_main
from stages.lib.params import load_params
from stages.lib.run import print_summary, stage_paths, train_and_save, training_env


@stage_main
def main() -> None:
    params = load_params().train
    images_dir, outputs = stage_paths(__doc__)
    with training_env(params) as env:  # torchrun's ranks, the device and precision, the clock
        torch.manual_seed(params.seed)
        data = load_data(images_dir, env.device, memory_budget(params.memory_budget, env.device))
        with env.watch.section():  # the whitening is part of the training time, as airbench counts it
            model = fresh_model(params.arch, len(data.classes), data.train_images)
        metrics = train_and_save(model, scratch_groups(model, params), params, data, env, outputs,
                                 recorded={}, report={})
    print_summary("train", metrics, env)


if __name__ == "__main__":
    main()
