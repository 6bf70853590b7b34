"""Benchmark: fewer multiplies per conv. Airbench's 3x3 convs, forward and backward in bf16 on
the CPU, by what training runs (stages.model.Conv3x3: oneDNN's direct kernel) against Winograd's
F(2x2, 3x3), which computes the same conv with 16 multiplies per 2x2 output tile instead of 36
(`winograd_conv`, its tile transforms in plain torch ops); then Winograd's three matrix products
alone, for F(2x2, 3x3) and F(4x4, 3x3) (36 multiplies per 4x4 tile instead of 144): its ceiling,
were its transforms free.

usage: python -m bench.winograd [--images 1024] [--rounds 3] [--side 32]

Each conv of the network at --side px (as hooks on a forward pass record them), on --images
random images; the direct conv and Winograd's take turns round by round, and each prints its
fastest round's milliseconds (forward, then backward to the input and the weight), the ratio
and, for the direct conv, its GFLOP/s; then the same summed over the network's convs.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from stages.devices import cpu_summary
from stages.model import Conv3x3, build_model

# F(2x2, 3x3)'s filter transform (Lavin & Gray, 2015); its data and output transforms are
# written out in tiles_in and tiles_out (entries 0 and +-1: adds only).
FILTER = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])


def tiles_in(padded: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """(N, 2th+2, 2tw+2, C) -> (4, 4, N, th, tw, C): B^T d B of each 4x4 tile d at stride 2."""
    rows = [padded[:, k:k + 2 * th:2] for k in range(4)]
    rows = (rows[0] - rows[2], rows[1] + rows[2], rows[2] - rows[1], rows[1] - rows[3])
    out = padded.new_empty((4, 4, padded.shape[0], th, tw, padded.shape[-1]))
    for a, row in enumerate(rows):
        c = [row[:, :, k:k + 2 * tw:2] for k in range(4)]
        torch.sub(c[0], c[2], out=out[a, 0])
        torch.add(c[1], c[2], out=out[a, 1])
        torch.sub(c[2], c[1], out=out[a, 2])
        torch.sub(c[1], c[3], out=out[a, 3])
    return out


def tiles_in_adjoint(grad: torch.Tensor) -> torch.Tensor:
    """tiles_in's adjoint: (4, 4, N, th, tw, C) -> (N, 2th+2, 2tw+2, C), overlapping tiles summed."""
    def spread(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        # B's columns put tile entry k at offsets 0-3; offsets 0 and 2 land on even positions
        c0, c1, c2, c3 = parts[0], parts[1] - parts[2] + parts[3], parts[1] + parts[2] - parts[0], -parts[3]
        n = c0.shape[dim]
        shape = list(c0.shape)
        shape[dim] = n + 1
        even, odd = c0.new_zeros(shape), c0.new_zeros(shape)
        even.narrow(dim, 0, n).copy_(c0)
        even.narrow(dim, 1, n).add_(c2)
        odd.narrow(dim, 0, n).copy_(c1)
        odd.narrow(dim, 1, n).add_(c3)
        shape[dim] = 2 * n + 2
        return torch.stack([even, odd], dim=dim + 1).reshape(shape)

    return spread([spread([grad[a, b] for b in range(4)], 2) for a in range(4)], 1)


def tiles_out(m: torch.Tensor) -> torch.Tensor:
    """(4, 4, N, th, tw, C) -> (N, th, 2, tw, 2, C): A^T m A, each tile's 2x2 outputs."""
    n, th, tw, c = m.shape[2:]
    out = m.new_empty((n, th, 2, tw, 2, c))
    halves = [(m[0, b] + m[1, b] + m[2, b], m[1, b] - m[2, b] - m[3, b]) for b in range(4)]
    for r in range(2):
        q = [halves[b][r] for b in range(4)]
        torch.add(q[0] + q[1], q[2], out=out[:, :, r, :, 0])
        torch.sub(q[1] - q[2], q[3], out=out[:, :, r, :, 1])
    return out


def tiles_out_adjoint(grad: torch.Tensor) -> torch.Tensor:
    """tiles_out's adjoint: (N, th, 2, tw, 2, C) -> (4, 4, N, th, tw, C)."""
    def expand(first: torch.Tensor, second: torch.Tensor) -> list[torch.Tensor]:
        return [first, first + second, first - second, -second]  # A's rows

    rows = expand(grad[:, :, 0], grad[:, :, 1])  # each (N, th, tw, 2, C)
    return torch.stack([torch.stack(expand(row[:, :, :, 0], row[:, :, :, 1])) for row in rows])


class WinogradConv(torch.autograd.Function):
    """F.conv2d(x, weight, padding=1) for a 3x3 weight by Winograd's F(2x2, 3x3): the data
    and the output gradient in 4x4 tiles at stride 2, each of the 16 transformed positions one
    matrix product over the channels; inside, channels last. Exact up to rounding."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
        n, cin, h, w = x.shape
        cout = weight.shape[0]
        th, tw = math.ceil(h / 2), math.ceil(w / 2)
        padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 2 * tw + 1 - w, 1, 2 * th + 1 - h))
        v = tiles_in(padded, th, tw).view(16, -1, cin)
        exact = torch.promote_types(weight.dtype, torch.float32)
        g = FILTER.to(weight.device, exact)
        u = torch.einsum("ak,bl,oikl->abio", g, g, weight.to(exact)).reshape(16, cin, cout)
        u = u.to(x.dtype)
        y = tiles_out(torch.bmm(v, u).view(4, 4, n, th, tw, cout))
        ctx.save_for_backward(v, u)
        ctx.sizes = (h, w, th, tw, weight.dtype)
        y = y.view(n, 2 * th, 2 * tw, cout)[:, :h, :w].permute(0, 3, 1, 2)
        return y.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        v, u = ctx.saved_tensors
        h, w, th, tw, weight_dtype = ctx.sizes
        n, cout = grad.shape[:2]
        grad = F.pad(grad.permute(0, 2, 3, 1), (0, 0, 0, 2 * tw - w, 0, 2 * th - h))
        gm = tiles_out_adjoint(grad.reshape(n, th, 2, tw, 2, cout)).view(16, -1, cout)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            gv = torch.bmm(gm, u.transpose(1, 2)).view(4, 4, n, th, tw, -1)
            grad_x = tiles_in_adjoint(gv)[:, 1:h + 1, 1:w + 1].permute(0, 3, 1, 2)
            grad_x = grad_x.contiguous(memory_format=torch.channels_last)
        if ctx.needs_input_grad[1]:
            exact = torch.promote_types(weight_dtype, torch.float32)
            gu = torch.bmm(v.transpose(1, 2), gm).view(4, 4, -1, cout).to(exact)
            g = FILTER.to(gu.device, exact)
            grad_weight = torch.einsum("ak,bl,abio->oikl", g, g, gu).to(weight_dtype)
        return grad_x, grad_weight


def winograd_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return WinogradConv.apply(x, weight)


def conv_shapes(arch: str, side: int) -> list[tuple[int, int, int]]:
    """(in channels, out channels, map side) of each Conv3x3 of `arch` at `side` px, in order."""
    model = build_model(arch, 10, (3, side, side))
    shapes: list[tuple[int, int, int]] = []
    for module in model.modules():
        if isinstance(module, Conv3x3):
            module.register_forward_hook(lambda m, inputs, _: shapes.append(
                (m.in_channels, m.out_channels, inputs[0].shape[-1])))
    with torch.no_grad():
        model(torch.randn(2, 3, side, side))
    return shapes


def fastest(runs: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Each run's fastest of `rounds` turns, in seconds, the runs taking turns (after one
    untimed warm-up turn each)."""
    best = {name: math.inf for name in runs}
    for turn in range(rounds + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if turn:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def conv_runs(cin: int, cout: int, side: int, images: int) -> dict[str, Callable[[], None]]:
    """Forward and backward of one conv, direct and by Winograd; and Winograd's three matrix
    products alone (forward, input gradient, weight gradient) at tiles of 2 and 4."""
    conv = Conv3x3(cin, cout)
    x = torch.randn(images, cin, side, side).contiguous(memory_format=torch.channels_last)
    x = x.to(torch.bfloat16).requires_grad_()
    grad = torch.randn(images, cout, side, side, dtype=torch.bfloat16)
    grad = grad.contiguous(memory_format=torch.channels_last)

    def step(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = forward(x)
            y.backward(grad)
            x.grad = conv.weight.grad = None
        return run

    def products(tile: int) -> Callable[[], None]:
        positions, tiles = (tile + 2) ** 2, images * math.ceil(side / tile) ** 2
        v = torch.randn(positions, tiles, cin, dtype=torch.bfloat16)
        u = torch.randn(positions, cin, cout, dtype=torch.bfloat16)
        gm = torch.randn(positions, tiles, cout, dtype=torch.bfloat16)
        return lambda: (torch.bmm(v, u), torch.bmm(gm, u.transpose(1, 2)),
                        torch.bmm(v.transpose(1, 2), gm))

    return {"direct": step(conv), "F(2x2,3x3)": step(lambda t: winograd_conv(t, conv.weight)),
            "F(2x2,3x3) products": products(2), "F(4x4,3x3) products": products(4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--side", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"CPU {cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"airbench's convs at {args.side} px, {args.images} images, bf16, forward + backward; "
          f"ms (each against direct)")
    totals: dict[str, float] = {}
    for cin, cout, side in conv_shapes("airbench", args.side):
        best = fastest(conv_runs(cin, cout, side, args.images), args.rounds)
        flops = 3 * 2 * args.images * side * side * cin * cout * 9
        line = ", ".join(f"{name} {s * 1e3:.1f} ({s / best['direct']:.2f})"
                         for name, s in best.items() if name != "direct")
        print(f"{cin:>3} -> {cout:>3} channels on {side}x{side}: direct {best['direct'] * 1e3:.1f} "
              f"({flops / best['direct'] / 1e9:.0f} GFLOP/s); {line}")
        for name, s in best.items():
            totals[name] = totals.get(name, 0.0) + s
    print("all convs: " + ", ".join(f"{name} {s * 1e3:.0f} ({s / totals['direct']:.2f})"
                                   for name, s in totals.items()))


if __name__ == "__main__":
    main()
