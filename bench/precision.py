"""Benchmark: one training step of the default network at each precision and memory layout,
measured side by side in one process, and the configuration the stages use (`amp: auto`,
channels_last) as a ratio to the fastest. Goal: <= 1.10 on every CPU kind.

usage: python -m bench.precision [--device cpu|auto|cuda|mps] [--batch-size N] [--steps N]

The configurations take turns, one step each per round, so that a machine whose speed drifts
(a shared VM) slows them alike; each reports its median step. On a CPU without native bf16 a
bf16 step is 10-20x slower than float32: with the defaults the whole run then takes minutes.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Callable

import torch

from stages.lib.clock import Stopwatch
from stages.lib.devices import Precision, cpu_summary, device_name, pick_device, pick_precision
from stages.lib.inference import autocast
from stages.lib.nets import build_model
from stages.lib.optim import make_optimizer, scratch_groups
from stages.lib.params import TrainParams, load_params

LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
GOAL = 1.10


@dataclasses.dataclass(frozen=True)
class Config:
    precision: str
    layout: str


def precisions(device: torch.device) -> dict[str, torch.dtype | None]:
    """float32 and the half type the device autocasts to (`amp: true`'s)."""
    half = pick_precision(device, True)
    return {"float32": None, half.name: half.dtype}


def make_step(params: TrainParams, device: torch.device, config: Config,
              batch_size: int) -> Callable[[], None]:
    """The loop's training step (forward, label-smoothed loss, backward, SGD) on random data."""
    layout, dtype = LAYOUTS[config.layout], precisions(device)[config.precision]
    torch.manual_seed(0)
    model = build_model(params.arch, 10, (3, 32, 32)).to(device, memory_format=layout).train()
    optimizer = make_optimizer(params, scratch_groups(model, params))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=params.label_smoothing)
    images = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(memory_format=layout)
    labels = torch.randint(0, 10, (batch_size,), device=device)

    def step() -> None:
        with autocast(device, dtype):
            loss = criterion(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def measure(params: TrainParams, device: torch.device, batch_size: int,
            steps: int) -> dict[Config, float]:
    """Median seconds per step of every configuration, taking turns (after one warm-up each)."""
    configs = [Config(p, lay) for p in precisions(device) for lay in LAYOUTS]
    step_fns = {c: make_step(params, device, c, batch_size) for c in configs}
    for step in step_fns.values():
        step()
    times: dict[Config, list[float]] = {c: [] for c in configs}
    for _ in range(steps):
        for config, step in step_fns.items():
            watch = Stopwatch(device)
            with watch.section():
                step()
            times[config].append(watch.seconds())
    return {c: statistics.median(t) for c, t in times.items()}


def report(medians: dict[Config, float], chosen: Config, precision: Precision,
           batch_size: int) -> list[str]:
    """The table's lines: every configuration, then the chosen one's ratio to the fastest."""
    fastest = min(medians.values())
    lines = [f"{'precision':<10} {'layout':<14} {'step s':>8} {'img/s':>8} {'vs fastest':>10}"]
    for config, seconds in sorted(medians.items(), key=lambda item: item[1]):
        mark = "  <- the stages' choice" if config == chosen else ""
        lines.append(f"{config.precision:<10} {config.layout:<14} {seconds:8.3f} "
                     f"{batch_size / seconds:8.0f} {seconds / fastest:9.2f}x{mark}")
    ratio = medians[chosen] / fastest
    verdict = "met" if ratio <= GOAL else "MISSED"
    lines.append(f"the stages compute in {chosen.precision} + {chosen.layout} ({precision.reason}): "
                 f"{ratio:.2f}x the fastest (goal <= {GOAL:.2f}: {verdict})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    args = parser.parse_args()
    params = load_params().train
    device = pick_device(args.device)
    precision = pick_precision(device, params.amp)
    chosen = Config(precision.name, "channels_last")  # the loop always trains channels_last
    print(f"{params.arch}, one training step of batch {args.batch_size}, median of {args.steps}; "
          f"device {device_name(device)}; CPU {cpu_summary()}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    medians = measure(params, device, args.batch_size, args.steps)
    print("\n".join(report(medians, chosen, precision, args.batch_size)))


if __name__ == "__main__":
    main()
