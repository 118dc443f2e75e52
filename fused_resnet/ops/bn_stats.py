"""Per-channel batch statistics of z: mean and biased variance, stable for a
large mean with a small spread, accumulated in fp32 (fp64 for fp64 z)."""

from __future__ import annotations

import torch

from .. import dispatch
from . import reference

if dispatch.native_loaded():

    @torch.library.register_fake("fused_resnet::bn_stats")
    def _bn_stats_fake(z):
        torch._check(z.dim() >= 2, lambda: "fused_resnet.bn_stats: `z` must have at least 2 dims (N, C, ...)")
        dt = reference.stat_dtype(z.dtype)
        return z.new_empty((z.shape[1],), dtype=dt), z.new_empty((z.shape[1],), dtype=dt)

    def _bn_stats_setup(ctx, inputs, output):
        (z,) = inputs
        mean, _ = output
        ctx.save_for_backward(z, mean)

    def _bn_stats_backward(ctx, dmean, dvar):
        # d mean / dz = 1/M; d var / dz = 2 (z - mean) / M (biased variance).
        z, mean = ctx.saved_tensors
        shape = (1, -1) + (1,) * (z.dim() - 2)
        m = z.numel() // z.shape[1] if z.shape[1] else 0
        acc = mean.dtype
        dz = torch.zeros_like(z, dtype=acc)
        if dmean is not None:
            dz = dz + dmean.view(shape) / m
        if dvar is not None:
            dz = dz + (z.to(acc) - mean.view(shape)) * (2.0 / m) * dvar.view(shape)
        return dz.to(z.dtype)

    torch.library.register_autograd("fused_resnet::bn_stats", _bn_stats_backward, setup_context=_bn_stats_setup)


def bn_stats(z: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mean and biased variance of z per channel (dim 1).

    Args:
        z: (N, C, ...) fp32/fp16/bf16/fp64, contiguous or channels_last (other
            strides are copied to contiguous first).
        backend: None (the global choice) or a backend name; "reference" runs
            fused_resnet.ops.reference.bn_stats.

    Returns (mean, var), each of shape (C,), fp32 (fp64 for fp64 z). Partial
    results are merged in a fixed order, so the result is reproducible.
    """
    return dispatch.kernel_for("bn_stats", z, backend)(z)
