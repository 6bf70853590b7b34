"""train: data/packed -> models/train/{model.pt,model.json}, metrics/train.json, DVCLive curves

usage: python -m stages.train PACKED_DIR MODEL_DIR METRICS_JSON LIVE_DIR CHECKPOINT

Trains `train.arch` from scratch with the train section's recipe. A checkpoint is written
after every epoch; a rerun with the same params and data resumes from it.
"""
from __future__ import annotations

from stages.lib.params import preflight

preflight(__name__, __doc__)  # --help, and bad params.yaml, answered before the slow imports

import torch

from stages.lib.data import load_data
from stages.lib.devices import memory_budget
from stages.lib.harness import (epoch_logger, final_metrics, fingerprint, print_summary,
                                save_trained, stage_paths, training_env)
from stages.lib.loop import Checkpoint, Training, fit, training_loader
from stages.lib.nets import fresh_model
from stages.lib.optim import scratch_groups
from stages.lib.outputs import stage_main
from stages.lib.params import load_params


@stage_main
def main() -> None:
    params = load_params().train
    packed_dir, outputs = stage_paths(__doc__)
    with training_env(params) as env:  # torchrun's ranks, the device and precision, the clock
        torch.manual_seed(params.seed)
        data = load_data(packed_dir, env.device, memory_budget(params.memory_budget, env.device))
        with env.watch.section():  # the whitening is part of the training time, as airbench counts it
            model = fresh_model(params.arch, len(data.classes), data.train_images)
        loader = training_loader(params, data.train_images, data.train_labels, params.seed, env.ranks)
        training = Training(model, scratch_groups(model, params), params, loader, env)
        checkpoint = Checkpoint(outputs.checkpoint, fingerprint(params, data, env))
        with epoch_logger(outputs.live_dir, training) as log_epoch:
            fit(training, data.val, checkpoint, log_epoch)
        if env.ranks.main:
            metrics = final_metrics(training, data)
            save_trained(training, data, outputs, metrics)
            print_summary("train", metrics)


if __name__ == "__main__":
    main()
