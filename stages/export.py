"""export: models/finetune -> models/export/{model.pt2,classes.json}

usage: python -m stages.export MODEL_DIR OUT_DIR

A torch.export program that runs without this project's code:
`torch.export.load("model.pt2").module()(images)` maps float images in [0, 1]
(N x C x H x W, any N; C and H x W as the model was trained) to logits; the
normalization is inside the graph. MODEL_DIR may also be given as its model.pt.
"""
from __future__ import annotations

from stages.lib.params import preflight

preflight(__name__, __doc__)  # --help, and bad params.yaml, answered before the slow imports

import json
import sys
from pathlib import Path

import torch
from torch import nn

from stages.lib.card import load_trained, model_dir_of
from stages.lib.outputs import atomic_dir, stage_main


class Normalized(nn.Module):
    """The model with its input normalization folded in, so the artifact stands alone."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def export(model_dir: Path, out: Path) -> None:
    model, card = load_trained(model_dir)
    stats = card.normalization
    wrapped = Normalized(model, stats["mean"], stats["std"]).eval()
    example = torch.zeros(2, *card.shape)  # shapes only: no random draw into the artifact
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(wrapped, (example,), dynamic_shapes=({0: batch},))
    with atomic_dir(out) as tmp:
        torch.export.save(program, tmp / "model.pt2")
        (tmp / "classes.json").write_text(json.dumps(card.classes) + "\n")
    print(f"export: wrote {out / 'model.pt2'} ({card.arch}, {len(card.classes)} classes)")


@stage_main
def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    export(model_dir_of(Path(sys.argv[1])), Path(sys.argv[2]))


if __name__ == "__main__":
    main()
