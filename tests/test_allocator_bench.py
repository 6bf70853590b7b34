"""bench.allocator: both malloc settings measured on the train stage's step (the times are the
bench's to print; the page faults show the setting at work)."""
import platform
import re
import sys

import pytest

from bench import allocator
from stages.devices import KEEP_FREED, mallopt
from stages.params import load_params


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_kept_memory_spares_the_steps_page_faults(monkeypatch, capsys) -> None:
    # three timed steps a setting, compared by their median, so that one odd step cannot
    # decide: with two, CI once saw the kept memory's mean at 268k faults (the default's 781k;
    # the same test alone: 0-11k), cause not pinned down
    monkeypatch.setattr(sys, "argv", ["allocator", "--images", "2048", "--rounds", "1", "--steps", "3"])
    try:
        allocator.main()
    finally:  # the process's malloc as the other tests expect it (stages on the CPU set it)
        mallopt(KEEP_FREED)
    out = capsys.readouterr().out
    faults = {name: int(count) for name, count in
              re.findall(r"^(glibc default|memory kept) .* (\d+) page faults a step$", out, re.M)}
    assert faults["memory kept"] < faults["glibc default"] // 10
    train = load_params().train
    assert f"step, batch {train.batch_size}, optimizer {train.optimizer}" in out
