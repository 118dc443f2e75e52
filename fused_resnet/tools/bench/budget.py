"""What every bench run shares: the dtypes by name, and the time budget of
one provider (or one backend's layers) in one mode."""

from __future__ import annotations

import contextlib
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Budget:
    """The seconds one provider may spend in one mode: its build, first call,
    warm-up and timed steps, counting its own calls only (in rounds the other
    providers' steps do not count). Checked between calls: a call in flight
    is never interrupted, so a single call that hangs is the caller's hard
    time limit's business (gpu_check runs each bench in a process with one)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.spent = 0.0

    @contextlib.contextmanager
    def charge(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.spent += time.perf_counter() - t0

    def over(self) -> bool:
        return self.seconds is not None and self.spent > self.seconds
