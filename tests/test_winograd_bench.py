"""bench.winograd: its Winograd conv is the conv (values and both gradients), on even and odd
maps, and it benches the network's own convs (the times are the bench's to print)."""
import pytest
import torch
import torch.nn.functional as F

from bench import winograd


@pytest.mark.parametrize("side", [1, 3, 4, 7])
def test_winograd_conv_and_its_gradients_are_the_convs(side: int) -> None:
    torch.manual_seed(side)
    x = torch.randn(2, 3, side, side + 1, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 5, side, side + 1, dtype=torch.float64)
    ours = torch.autograd.grad(winograd.winograd_conv(x, weight), (x, weight), grad)
    theirs = torch.autograd.grad(F.conv2d(x, weight, padding=1), (x, weight), grad)
    torch.testing.assert_close(winograd.winograd_conv(x, weight), F.conv2d(x, weight, padding=1))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_it_benches_the_networks_convs_at_the_side_given() -> None:
    assert winograd.conv_shapes("airbench", 32) == [
        (24, 64, 31), (64, 64, 15), (64, 256, 15), (256, 256, 7), (256, 256, 7), (256, 256, 3)]
    assert [s[-1] for s in winograd.conv_shapes("airbench", 16)] == [15, 7, 7, 3, 3, 1]


def test_in_bf16_its_rounding_stays_near_the_direct_convs() -> None:
    # the bench compares like with like only if Winograd's answer is as good: here 0.7% of the
    # output's norm against oneDNN's 0.3% (bf16 keeps 8 bits; the transforms add roundings)
    torch.manual_seed(0)
    x, weight = torch.randn(8, 64, 15, 15), torch.randn(128, 64, 3, 3) / 24
    exact = F.conv2d(x, weight, padding=1)
    x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    direct = F.conv2d(x, weight.to(torch.bfloat16), padding=1).float()
    ours = winograd.winograd_conv(x, weight).float()
    error = (ours - exact).norm() / exact.norm()
    assert error < 0.01 and error < 3 * (direct - exact).norm() / exact.norm()
