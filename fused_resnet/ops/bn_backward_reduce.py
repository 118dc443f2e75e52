"""The reduction half of the fused BatchNorm backward, for synchronised
BatchNorm: per-channel sum(dy') and sum(dy' * xhat), which the processes
all-reduce before the elementwise half (bn_backward_elemt)."""

from __future__ import annotations

import torch

from .. import dispatch
from . import reference

if dispatch.native_loaded():

    @torch.library.register_fake("fused_resnet::bn_backward_reduce")
    def _bn_backward_reduce_fake(dy, z, mask, mean, invstd):
        torch._check(dy.shape == z.shape, lambda: "fused_resnet.bn_backward_reduce: `dy` must have z's shape")
        acc = reference.stat_dtype(z.dtype)
        c = z.shape[1]
        return z.new_empty((c,), dtype=acc), z.new_empty((c,), dtype=acc)


    def _refuse_double_backward(ctx, *grads):
        raise NotImplementedError(
            "fused_resnet.bn_backward_reduce is not differentiable: double backward through the synchronised BatchNorm "
            "is not supported")

    # A formula that refuses keeps autograd from treating the outputs as constants.
    torch.library.register_autograd("fused_resnet::bn_backward_reduce", _refuse_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


def bn_backward_reduce(
    dy: torch.Tensor,
    z: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_dy, sum_dy_xhat): per channel, sum g and sum g * xhat with g = dy
    masked by the ReLU mask (empty mask: no ReLU) and xhat = (z - mean) *
    invstd. They are this process's dbias and dweight. fp32 (fp64 for fp64 z),
    deterministic (fixed-order partial sums). Not differentiable."""
    return dispatch.kernel_for("bn_backward_reduce", z, backend)(dy, z, mask, mean, invstd)
