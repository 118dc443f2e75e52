"""`make gpu-check`: the lease-sized GPU check (check.DESCRIPTION says what
it does; benchmarks/README.md gives the device call)."""

from .check import main

__all__ = ["main"]
