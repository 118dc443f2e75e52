"""The elementwise half of the fused BatchNorm backward, for synchronised
BatchNorm: dz and the residual gradient from per-channel sums that cover
every process's batch (see bn_backward_reduce)."""

from __future__ import annotations

import torch

from .. import dispatch
from . import reference

if dispatch.native_loaded():

    @torch.library.register_fake("fused_resnet::bn_backward_elemt")
    def _bn_backward_elemt_fake(dy, z, mask, mean, invstd, weight, sum_dy, sum_dy_xhat, count,
                                need_residual_grad):
        torch._check(dy.shape == z.shape, lambda: "fused_resnet.bn_backward_elemt: `dy` must have z's shape")
        fmt = reference.memory_format_of(z)
        dz = torch.empty_like(z, memory_format=fmt)
        dres = torch.empty_like(dy, memory_format=fmt) if need_residual_grad else dy.new_empty((0,))
        return dz, dres


    def _refuse_double_backward(ctx, *grads):
        raise NotImplementedError(
            "fused_resnet.bn_backward_elemt is not differentiable: double backward through the synchronised BatchNorm "
            "is not supported")

    # A formula that refuses keeps autograd from treating the outputs as constants.
    torch.library.register_autograd("fused_resnet::bn_backward_elemt", _refuse_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


def bn_backward_elemt(
    dy: torch.Tensor,
    z: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    sum_dy: torch.Tensor,
    sum_dy_xhat: torch.Tensor,
    count: int,
    need_residual_grad: bool,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dz = weight * invstd * (g - (sum_dy + xhat * sum_dy_xhat) / count) and
    dresidual = g (or an empty tensor), g = dy masked by the ReLU mask; the
    sums and `count` (values per channel) are over the whole synchronised
    batch. dz in z's dtype and memory format. One pass over memory."""
    return dispatch.kernel_for("bn_backward_elemt", z, backend)(dy, z, mask, mean, invstd, weight, sum_dy,
                                                                sum_dy_xhat, count, need_residual_grad)
