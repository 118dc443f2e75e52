"""Fused BatchNorm apply + optional residual add + optional ReLU, writing a
1-bit-per-element ReLU mask for the backward instead of keeping y."""

from __future__ import annotations

import torch

from .. import dispatch
from . import reference

if dispatch.native_loaded():

    @torch.library.register_fake("fused_resnet::bn_apply")
    def _bn_apply_fake(z, scale, shift, residual, relu, out_dtype=None):
        torch._check(z.dim() >= 2, lambda: "fused_resnet.bn_apply: `z` must have at least 2 dims (N, C, ...)")
        if residual is not None:
            torch._check(residual.shape == z.shape, lambda: "fused_resnet.bn_apply: `residual` must have z's shape")
        fmt = reference.memory_format_of(z)
        y = torch.empty_like(z, dtype=out_dtype or z.dtype, memory_format=fmt)
        n = (z.numel() + 7) // 8 if relu else 0
        return y, z.new_empty((n,), dtype=torch.uint8)

    def _bn_apply_setup(ctx, inputs, output):
        z, scale, shift, residual, relu, out_dtype = inputs
        _, mask = output
        ctx.has_residual = residual is not None
        ctx.res_dtype = residual.dtype if residual is not None else None
        ctx.dtypes = (scale.dtype, shift.dtype)
        ctx.save_for_backward(z, mask, scale)

    def _bn_apply_backward(ctx, dy, _dmask):
        # bn_apply is BatchNorm with mean 0, invstd 1 and weight `scale`, with
        # fixed statistics: dz = scale * g, dscale = sum(g z), dshift = sum(g).
        z, mask, scale = ctx.saved_tensors
        acc = reference.stat_dtype(z.dtype)
        zeros = torch.zeros_like(scale, dtype=acc)
        ones = torch.ones_like(scale, dtype=acc)
        dz, dres, dscale, dshift = torch.ops.fused_resnet.bn_backward(
            dy, z, mask, zeros, ones, scale, False, ctx.has_residual)
        dr = dres.to(ctx.res_dtype) if ctx.has_residual else None
        return dz, dscale.to(ctx.dtypes[0]), dshift.to(ctx.dtypes[1]), dr, None, None

    torch.library.register_autograd("fused_resnet::bn_apply", _bn_apply_backward, setup_context=_bn_apply_setup)


def bn_apply(
    z: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
    out_dtype: torch.dtype | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = [relu](z * scale[c] + shift[c] [+ residual]) in one pass, and the mask.

    Args:
        z: (N, C, ...) fp32/fp16/bf16/fp64, contiguous or channels_last.
        scale, shift: (C,) per-channel, usually fp32 from bn_finalize.
        residual: None or a tensor of z's shape (any float dtype and layout;
            one matching z's dtype and layout takes the fast path).
        relu: apply ReLU and return its bit-packed mask.
        out_dtype: dtype of y (default z's); y is computed in z's dtype and cast.

    Rounding as eager: the BN output is rounded to z's dtype before the
    residual add. Returns (y in z's memory format, mask: uint8 of
    ceil(numel / 8) bytes, bit i % 8 of byte i // 8 = (y > 0) for element i in
    memory order; empty when relu is False).
    """
    return dispatch.kernel_for("bn_apply", z, backend)(z, scale, shift, residual, relu, out_dtype)
