"""Caps on the Triton conv's autotuning, and a log of what each tuning cost.

Autotuning times every candidate config of a new shape bucket with
triton.testing.do_bench; each candidate's first launch also compiles it. On
a short GPU lease that must fit a budget, so two caps (fused_resnet/config.py,
set_autotune() or the environment at import):

  shape_s  ($FUSED_RESNET_AUTOTUNE_SHAPE_S) seconds one key may spend: once
           spent, the remaining candidates are not timed and the best so far
           is taken (at least one is timed).
  run_s    ($FUSED_RESNET_AUTOTUNE_RUN_S) seconds the whole process may spend
           tuning: once spent, each new key takes its first candidate
           untimed, kept in memory only (not written to the disk cache, so a
           later run still tunes it).

None (the default) means no cap. The log ($FUSED_RESNET_AUTOTUNE_LOG) is a
file that gets one JSON line per key this process chose a config for: the
key, the choice, how many candidates were timed out of how many, the seconds
it took, the cap that cut it short (if any) and each candidate's time in ms.
`make gpu-check` exports the log with the tuned configs
(fused_resnet/tools/gpu_check/tuned_configs.py).
"""

from __future__ import annotations

import json
import os
import threading
import time

from ... import config


class TuningBudget:
    """The seconds this process has spent tuning, against the configured caps."""

    def __init__(self):
        self.spent = 0.0
        self._lock = threading.Lock()

    @property
    def shape_s(self) -> float | None:
        return config.get("autotune_shape_s")

    @property
    def run_s(self) -> float | None:
        return config.get("autotune_run_s")

    def run_spent(self) -> bool:
        run_s = self.run_s
        with self._lock:
            return run_s is not None and self.spent >= run_s

    def key_over(self, started: float) -> str | None:
        """Why timing the next candidate of a key started at `started`
        (time.perf_counter()) should stop, or None."""
        elapsed = time.perf_counter() - started
        shape_s, run_s = self.shape_s, self.run_s
        if shape_s is not None and elapsed >= shape_s:
            return f"shape budget {shape_s:g} s"
        with self._lock:
            if run_s is not None and self.spent + elapsed >= run_s:
                return f"run budget {run_s:g} s"
        return None

    def charge(self, seconds: float) -> None:
        with self._lock:
            self.spent += seconds


_budget = TuningBudget()


def current() -> TuningBudget:
    """The process-wide budget."""
    return _budget


def reset() -> None:
    """Forget what was spent (tests)."""
    global _budget
    _budget = TuningBudget()


def log(entry: dict) -> None:
    """Append one JSON line to the configured log, if any. A line this
    short is written by one write() call, so processes tuning at once do not
    interleave within a line; a log that cannot be written is skipped (it is
    a record, never needed to run)."""
    path = config.get("autotune_log")
    if not path:
        return
    line = json.dumps({**entry, "pid": os.getpid(), "time": round(time.time(), 1)}, sort_keys=True) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def read_log(path: str) -> list[dict]:
    """The entries of a log file (unreadable lines skipped)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict):
                    out.append(entry)
    except OSError:
        pass
    return out
