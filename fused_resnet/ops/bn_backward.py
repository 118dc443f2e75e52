"""Fused backward of BatchNorm apply + residual add + ReLU: one reduction pass
and one elementwise pass, from dy, z and the ReLU bit mask."""

from __future__ import annotations

import torch

from .. import dispatch
from . import reference

if dispatch.native_loaded():

    @torch.library.register_fake("fused_resnet::bn_backward")
    def _bn_backward_fake(dy, z, mask, mean, invstd, weight, batch_stats, need_residual_grad):
        torch._check(dy.shape == z.shape, lambda: "fused_resnet.bn_backward: `dy` must have z's shape")
        fmt = reference.memory_format_of(z)
        acc = reference.stat_dtype(z.dtype)
        dz = torch.empty_like(z, memory_format=fmt)
        if need_residual_grad:
            dres = torch.empty_like(dy, memory_format=fmt)
        else:
            dres = dy.new_empty((0,))
        c = z.shape[1]
        return dz, dres, z.new_empty((c,), dtype=acc), z.new_empty((c,), dtype=acc)

    def _bn_backward_setup(ctx, inputs, output):
        pass

    def _bn_backward_backward(ctx, *grads):
        raise NotImplementedError(
            "fused_resnet.bn_backward is not differentiable: double backward through the fused BatchNorm "
            "is not supported (use backend='reference' for higher-order gradients)")

    # A registered formula (even one that refuses) keeps autograd from
    # silently treating the op's outputs as constants.
    torch.library.register_autograd("fused_resnet::bn_backward", _bn_backward_backward,
                                    setup_context=_bn_backward_setup)


def bn_backward(
    dy: torch.Tensor,
    z: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    batch_stats: bool,
    need_residual_grad: bool,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of y = [relu](bn(z) [+ r]) given dy.

    g = dy where the mask bit is set (all of dy for an empty mask); with
    xhat = (z - mean) * invstd: dbias = sum g, dweight = sum g * xhat,
    dz = weight * invstd * (g - [batch_stats] (dbias + xhat * dweight) / M),
    M = numel / C. Returns (dz in z's dtype and memory format, dresidual = g
    in dy's dtype or an empty tensor, dweight, dbias in fp32 (fp64 for fp64)).
    Deterministic: partial sums are combined in a fixed order.
    """
    return dispatch.kernel_for("bn_backward", z, backend)(dy, z, mask, mean, invstd, weight, batch_stats,
                                                          need_residual_grad)
