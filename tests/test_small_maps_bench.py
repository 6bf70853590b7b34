"""bench.small_maps: it times the recipe's steps at the sizes its epochs train at, and its
baseline really turns the patch matmul off (the times are the bench's to print)."""
import dataclasses

import torch

from bench import small_maps
from stages.model import DiracConv
from stages.params import load_params


def test_the_benched_sizes_are_the_recipes_epochs() -> None:
    train = dataclasses.replace(load_params().train, epochs=8.0, progressive_from=16,
                                progressive_until=0.5)
    assert small_maps.epoch_sizes(train) == [16, 20, 24, 28, 32, 32, 32, 32]
    flat = dataclasses.replace(train, progressive_from=0, epochs=3.5)
    assert small_maps.epoch_sizes(flat) == [32] * 4


def test_the_baseline_setting_sends_no_map_to_the_patch_matmul() -> None:
    conv = DiracConv(4, 4)
    x = torch.randn(2, 4, 3, 3)
    try:
        for pixels, matmul in ((0, False), (small_maps.BOUND, True)):
            small_maps.bound(pixels)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert ("PatchMatmulConv" in conv(x).grad_fn.name()) == matmul
    finally:
        small_maps.bound(small_maps.BOUND)
