"""The CPU output cache: where the C++ CPU ops get their large outputs.

glibc serves each large allocation with a fresh mmap and unmaps it on free,
so without a cache every call of a BN op page-faults its outputs in again; on
the machines we measured that cost more than the kernels (README, "CPU: the
allocator matters"). The cache keeps freed output blocks mapped and hands them
to the next output of a fitting size, the way torch.cuda's caching allocator
keeps device memory. Only fused_resnet's CPU ops use it; the process
allocator, and so every aten op, is left alone.

Bounded: a freed block is kept only while the cache holds at most `limit`
bytes (config "cpu_cache_bytes": default 256 MiB, $FUSED_RESNET_CPU_CACHE_MB at
import, set_cpu_cache_limit() after; 0 = off).
Blocks held by tensors count as allocated in torch.profiler's memory events;
blocks waiting in the cache do not (as torch.cuda.max_memory_allocated does
not count torch.cuda's cache), and cpu_cache_stats()["cached_bytes"] says how
many there are.
"""

from __future__ import annotations

import torch

from ... import config, dispatch


def _op(name: str):
    if not dispatch.native_loaded():
        return None
    return getattr(torch.ops.fused_resnet, name)


def cpu_cache_stats() -> dict[str, int]:
    """limit and cached_bytes (bytes), cached_blocks, and since the last
    reset_cpu_cache_counters(): hits (outputs served from the cache), misses
    (fresh blocks), evictions (freed blocks released because the cache was
    full). All zero when the extension is not built."""
    op = _op("cpu_cache_stats")
    names = ("limit", "cached_bytes", "cached_blocks", "hits", "misses", "evictions")
    if op is None:
        return dict.fromkeys(names, 0)
    return dict(zip(names, (int(v) for v in op())))


def set_cpu_cache_limit(limit_bytes: int) -> int:
    """Keep at most limit_bytes of freed blocks (0 turns the cache off and
    releases it); returns the previous limit. Blocks above a new, smaller
    limit are released now, largest first."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes < 0:
        raise ValueError(f"fused_resnet.set_cpu_cache_limit: `limit_bytes` must be an int >= 0, got {limit_bytes!r}")
    config.set_value("cpu_cache_bytes", limit_bytes, "set_cpu_cache_limit()")
    op = _op("cpu_cache_set_limit")
    return 0 if op is None else int(op(limit_bytes))


def apply_configured_limit() -> None:
    """Give the C++ cache the configured limit (at import: the extension
    starts at the default)."""
    op = _op("cpu_cache_set_limit")
    if op is not None:
        op(config.get("cpu_cache_bytes"))


def empty_cpu_cache() -> None:
    """Release every cached block to the system (tensors keep theirs)."""
    op = _op("cpu_cache_clear")
    if op is not None:
        op()


def reset_cpu_cache_counters() -> None:
    """Zero the hits / misses / evictions counters."""
    op = _op("cpu_cache_reset_counters")
    if op is not None:
        op()
