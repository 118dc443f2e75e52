"""How a functional op picks its implementation: the resolved backend for the
tensor's device (fused_resnet._backend.resolve), then the native kernel of
torch.ops.fused_resnet if it has one for that device, else the reference."""

from __future__ import annotations

import torch

from .. import _backend


def use_native(op: str, t: torch.Tensor, backend: str | None = None) -> bool:
    """True when torch.ops.fused_resnet.<op> should run for tensor t."""
    chosen = _backend.resolve(backend, t.device)
    if chosen == "reference":
        return False
    key = "CUDA" if t.device.type == "cuda" else "CPU"
    return _backend.has_kernel(op, key)


def native_op(op: str):
    return getattr(torch.ops.fused_resnet, op)


def bump_versions(*tensors) -> None:
    """Mark tensors a native kernel wrote in place as changed.

    The kernels write running statistics through raw pointers, and with no
    autograd kernel registered nothing bumps their version counters, so
    version-keyed caches (the BN fold cache) would keep a stale entry.
    torch.compile functionalises the mutation itself and uses no such cache."""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        if t is not None:
            torch.autograd.graph.increment_version(t)
