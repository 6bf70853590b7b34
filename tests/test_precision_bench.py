"""bench.precision's verdict, from given step times (its timings need the machine itself)."""
import torch

from bench.precision import Config, report
from stages.lib.devices import Precision


def test_report_gives_the_chosen_configurations_ratio_to_the_fastest() -> None:
    medians = {Config("float32", "channels_last"): 0.9, Config("float32", "contiguous"): 1.0,
               Config("bfloat16", "channels_last"): 12.0, Config("bfloat16", "contiguous"): 13.0}
    float32 = Precision(None, "amp auto: no native bf16")
    lines = report(medians, Config("float32", "channels_last"), float32, 256)
    assert lines[1].split()[:5] == ["float32", "channels_last", "0.900", "284", "1.00x"]
    assert lines[-1].endswith("1.00x the fastest (goal <= 1.10: met)")
    forced = report(medians, Config("bfloat16", "channels_last"), Precision(torch.bfloat16, "amp: true"), 256)
    assert forced[-1].endswith("13.33x the fastest (goal <= 1.10: MISSED)")
