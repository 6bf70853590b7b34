"""The clock of the training time, as airbench counts it: the sections a stage times, on the
device's own clock where it runs asynchronously."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class Stopwatch:
    """Seconds spent in timed sections, as the device sees them, plus the wall time since it
    was made. CUDA queues kernels and returns at once, so a host clock would time the queueing:
    there, events recorded on the stream time the work, and only reading them waits."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.started = time.perf_counter()
        self.carried = 0.0  # seconds from before a resume
        self.host = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def section(self) -> Iterator[None]:
        if self.device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            yield
            end.record()
            self.events.append((start, end))
            return
        if self.device.type == "mps":
            torch.mps.synchronize()  # work queued before the section is not the section's
        begin = time.perf_counter()
        yield
        if self.device.type == "mps":
            torch.mps.synchronize()
        self.host += time.perf_counter() - begin

    def seconds(self) -> float:
        """The timed sections' total (waits for the device)."""
        if self.events:
            self.events[-1][1].synchronize()
        device = sum(start.elapsed_time(end) for start, end in self.events) / 1000  # ms
        return self.carried + self.host + device

    def restore(self, seconds: float) -> None:
        """Resume at `seconds`: a checkpoint's total, which already holds everything this
        process timed again before resuming (e.g. the whitening)."""
        self.carried, self.host, self.events = seconds, 0.0, []

    def wall_seconds(self) -> float:
        return time.perf_counter() - self.started
