"""Caps on the Triton conv's autotuning, and a log of what each tuning cost.

Autotuning times every candidate config of a new shape bucket with
triton.testing.do_bench; each candidate's first launch also compiles it. On
a short GPU lease that must fit a budget, so two caps, read from the
environment when a process first tunes:

  FUSED_RESNET_AUTOTUNE_SHAPE_S  seconds one key may spend: once spent, the
                                 remaining candidates are not timed and the
                                 best so far is taken (at least one is timed).
  FUSED_RESNET_AUTOTUNE_RUN_S    seconds the whole process may spend tuning:
                                 once spent, each new key takes its first
                                 candidate untimed, kept in memory only (not
                                 written to the disk cache, so a later run
                                 still tunes it).

Unset (the default) means no cap. FUSED_RESNET_AUTOTUNE_LOG names a file
that gets one JSON line per key this process chose a config for: the key,
the choice, how many candidates were timed out of how many, the seconds it
took, the cap that cut it short (if any) and each candidate's time in ms.
`make gpu-check` exports the log with the tuned configs (fused_resnet/
gpu_check/tuned_configs.py).
"""

from __future__ import annotations

import json
import os
import threading
import time

SHAPE_ENV = "FUSED_RESNET_AUTOTUNE_SHAPE_S"
RUN_ENV = "FUSED_RESNET_AUTOTUNE_RUN_S"
LOG_ENV = "FUSED_RESNET_AUTOTUNE_LOG"


def _seconds(var: str) -> float | None:
    text = os.environ.get(var, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{var} must be a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise ValueError(f"{var} must be >= 0, got {text!r}")
    return value


class TuningBudget:
    """The process's tuning caps and the seconds spent so far."""

    def __init__(self, shape_s: float | None, run_s: float | None):
        self.shape_s, self.run_s = shape_s, run_s
        self.spent = 0.0
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> TuningBudget:
        return cls(_seconds(SHAPE_ENV), _seconds(RUN_ENV))

    def run_spent(self) -> bool:
        with self._lock:
            return self.run_s is not None and self.spent >= self.run_s

    def key_over(self, started: float) -> str | None:
        """Why timing the next candidate of a key started at `started`
        (time.perf_counter()) should stop, or None."""
        elapsed = time.perf_counter() - started
        if self.shape_s is not None and elapsed >= self.shape_s:
            return f"shape budget {self.shape_s:g} s"
        with self._lock:
            if self.run_s is not None and self.spent + elapsed >= self.run_s:
                return f"run budget {self.run_s:g} s"
        return None

    def charge(self, seconds: float) -> None:
        with self._lock:
            self.spent += seconds


_budget: TuningBudget | None = None
_budget_lock = threading.Lock()


def current() -> TuningBudget:
    """The process-wide budget, read from the environment at first use."""
    global _budget
    with _budget_lock:
        if _budget is None:
            _budget = TuningBudget.from_env()
        return _budget


def reset() -> None:
    """Forget the budget (and what was spent): the next use reads the
    environment again (tests)."""
    global _budget
    with _budget_lock:
        _budget = None


def log(entry: dict) -> None:
    """Append one JSON line to $FUSED_RESNET_AUTOTUNE_LOG, if set. A line this
    short is written by one write() call, so processes tuning at once do not
    interleave within a line; a log that cannot be written is skipped (it is
    a record, never needed to run)."""
    path = os.environ.get(LOG_ENV)
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
