"""Timing and peak-memory measurement shared by `fused-resnet bench`, the
roofline report and `pytest benchmarks/`.

Timing: every timed call ends with a device synchronisation, so a GPU step is
measured to its last kernel, not to its last launch.

Peak memory is defined the same way on every device: the highest amount of
tensor memory allocated during one step above what was allocated just before
it (activations, saved tensors, gradients that the step creates, workspaces
that go through PyTorch's allocator). Model weights and the input, live
before the step, are not counted.
  GPU: torch.cuda.max_memory_allocated() after reset_peak_memory_stats().
  CPU: PyTorch's CPU allocator reports every allocation and free to the
       profiler (profile_memory=True); we replay them in time order and take
       the running maximum. Memory oneDNN allocates privately is invisible
       to both methods.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ... import _compat


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], object], device: torch.device | str) -> tuple[float, object]:
    """Seconds for fn(), synchronised before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    return float(np.percentile(values, q))


@dataclass
class Timing:
    times_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def p50_ms(self) -> float:
        return percentile(self.times_s, 50) * 1e3

    @property
    def p90_ms(self) -> float:
        return percentile(self.times_s, 90) * 1e3


def time_steps(fn: Callable[[], object], device, steps: int, warmup: int,
               on_step: Callable[[], None] | None = None) -> Timing:
    """Run fn `warmup` times untimed, then `steps` times timed."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    for _ in range(warmup):
        fn()
        synchronize(device)
        if on_step:
            on_step()
    t = Timing()
    for _ in range(steps):
        dt, _ = timed_call(fn, device)
        t.times_s.append(dt)
        if on_step:
            on_step()
    return t


@contextlib.contextmanager
def _stderr_fd_silenced():
    """Kineto writes start/stop lines straight to fd 2; the step has already
    run cleanly before this untimed measurement, so nothing else is lost."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        sys.stderr.flush()
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int | None:
    from torch.profiler import ProfilerActivity, profile

    with _stderr_fd_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    mem = _compat.profiler_cpu_memory_events(prof)
    if mem is None:  # the profiler's result layout changed: say "unknown", never guess
        return None
    cur = peak = 0
    for _, nbytes in mem:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Peak tensor memory of one call of fn above what was allocated before
    it (see the module docstring), or None where it cannot be measured."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if device.type == "cpu":
        return _cpu_peak_bytes(fn)
    return None
