"""conv2d of relu(x * pre_scale + pre_shift) with conv2d_bn_act's epilogue,
in one Triton kernel: the previous layer's BatchNorm + ReLU applied to each
input tile as the conv loads it (the "prologue"), so that layer's normalised
activation is never written to memory, and it is not saved for backward
either: the backward recomputes it from x (elementwise) where it needs it.

Training use (fused_resnet.nn.block_paths, switch "prologue"): x is the
previous conv's raw output z_prev and pre_scale/pre_shift its BatchNorm's
batch-statistics scale (weight * invstd) and shift (bias - mean * scale),
computed from z_prev's epilogue sums; gradients flow to x, pre_scale and
pre_shift (hence through the statistics to z_prev) as eager's BN + ReLU +
conv would give them.

Backward: with the fusion switch prologue_dgrad (on by default) and a
stride-1 conv on the Triton kernel, the data gradient runs as one kernel
with the prologue's ReLU + BN backward in its epilogue
(op fused_resnet::conv2d_dgrad_prologue): d(activation) is never written, and the
activation is recomputed only for the weight gradient (aten). Otherwise
aten's data gradient, then the ReLU + BN backward elementwise.

The op fused_resnet::conv2d_prologue_bn_act has a fake kernel (torch.compile
traces it as one node) and a registered autograd formula. Its default
implementation computes the contract with the prologue materialised and
F.conv2d (reference.conv2d_prologue_bn_act); the triton backend registers
its kernels (backends/triton/conv_ops.py).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import config, dispatch
from . import reference
from .conv_epilogue import (aten_path, check_tensors, epilogue_backward, epilogue_grad_z, fake_outputs, pair,
                            recomputes_z, save_epilogue_context, saves_output)

_OP = "fused_resnet::conv2d_prologue_bn_act"


@torch.library.custom_op(_OP, mutates_args=())
def conv2d_prologue_bn_act_op(
    x: torch.Tensor,
    pre_scale: torch.Tensor,
    pre_shift: torch.Tensor,
    weight: torch.Tensor,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    relu: bool,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    emit_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = reference.bn_relu_prologue(x, pre_scale, pre_shift)
    return aten_path(a, weight, scale, shift, residual, relu, stride, padding, dilation, groups, emit_stats)


@conv2d_prologue_bn_act_op.register_fake
def _prologue_fake(x, pre_scale, pre_shift, weight, scale, shift, residual, relu, stride, padding, dilation, groups,
                   emit_stats):
    return fake_outputs(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, emit_stats)


def _setup_context(ctx, inputs, output):
    (x, pre_scale, pre_shift, weight, scale, shift, residual, relu, stride, padding, dilation, groups,
     emit_stats) = inputs
    save_epilogue_context(ctx, scale, shift, residual, relu, stride, padding, dilation, groups, emit_stats)
    # x (the raw previous output), not the activation: recomputed below.
    ctx.save_for_backward(x, pre_scale, pre_shift, weight, scale, output[0] if saves_output(ctx) else None)


def _fused_dgrad_runs(ctx, x, weight) -> bool:
    """Whether the backward's data gradient runs as the fused op
    conv2d_dgrad_prologue (one Triton kernel where it runs, with the
    prologue's ReLU + BN backward in its epilogue): switch prologue_dgrad
    on, stride 1, padding <= dilation * (kernel - 1)."""
    stride, padding, dilation, _ = ctx.conv_args
    kh, kw = weight.shape[2:]
    return (config.fusion("prologue_dgrad") and tuple(stride) == (1, 1)
            and padding[0] <= dilation[0] * (kh - 1) and padding[1] <= dilation[1] * (kw - 1))


def _backward(ctx, gy, gsum, gsumsq):
    x, pre_scale, pre_shift, weight, scale, y = ctx.saved_tensors
    need_x, need_ps, need_pt, need_w, need_scale, need_shift, need_res = ctx.needs_input_grad[:7]
    need_a = need_x or need_ps or need_pt
    if not (need_a and _fused_dgrad_runs(ctx, x, weight)):
        return _backward_unfused(ctx, x, pre_scale, pre_shift, weight, scale, y, gy, gsum, gsumsq)

    # The activation is recomputed only where still needed: the weight
    # gradient (aten) and a z that was not saved.
    a = (reference.bn_relu_prologue(x.detach(), pre_scale.detach(), pre_shift.detach())
         if need_w or recomputes_z(ctx, y, gsum, gsumsq, need_scale) else None)
    dz, d_scale, d_shift, d_residual = epilogue_grad_z(ctx, a if a is not None else x, weight, scale, y, gy, gsum,
                                                       gsumsq, (need_scale, need_shift, need_res))
    dz = dz.to(x.dtype)
    from .conv2d_dgrad_prologue import conv2d_dgrad_prologue

    _, padding, dilation, groups = ctx.conv_args
    dx, d_pre_scale, d_pre_shift = conv2d_dgrad_prologue(dz, weight.detach(), x.detach(), pre_scale.detach(),
                                                         pre_shift.detach(), padding, dilation, groups)
    dw = None
    if need_w:
        stride = ctx.conv_args[0]
        _, dw, _ = torch.ops.aten.convolution_backward(
            dz, a, weight, None, stride, padding, dilation, False, [0, 0], groups, [False, True, False])
    return _prologue_grads(ctx, pre_scale, pre_shift, dx, d_pre_scale, d_pre_shift) + (
        dw, d_scale, d_shift, d_residual, None, None, None, None, None, None)


def _backward_unfused(ctx, x, pre_scale, pre_shift, weight, scale, y, gy, gsum, gsumsq):
    need_x, need_ps, need_pt, need_w, need_scale, need_shift, need_res = ctx.needs_input_grad[:7]
    a = reference.bn_relu_prologue(x.detach(), pre_scale.detach(), pre_shift.detach())
    need_a = need_x or need_ps or need_pt
    da, dw, d_scale, d_shift, d_residual = epilogue_backward(ctx, a, weight, scale, y, gy, gsum, gsumsq,
                                                             (need_a, need_w, need_scale, need_shift, need_res))
    dx = d_pre_scale = d_pre_shift = None
    if need_a and da is not None:
        dx, d_pre_scale, d_pre_shift = reference.bn_relu_prologue_backward(da, x, pre_scale, a)
    return _prologue_grads(ctx, pre_scale, pre_shift, dx, d_pre_scale, d_pre_shift) + (
        dw, d_scale, d_shift, d_residual, None, None, None, None, None, None)


def _prologue_grads(ctx, pre_scale, pre_shift, dx, d_pre_scale, d_pre_shift):
    """The gradients of (x, pre_scale, pre_shift) as autograd wants them:
    None where not needed, the scale/shift sums in their parameters' dtype."""
    need_x, need_ps, need_pt = ctx.needs_input_grad[:3]
    return (dx if need_x else None, d_pre_scale.to(pre_scale.dtype) if need_ps else None,
            d_pre_shift.to(pre_shift.dtype) if need_pt else None)


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)


def conv2d_prologue_bn_act(
    x: torch.Tensor,
    pre_scale: torch.Tensor,
    pre_shift: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    emit_stats: bool = False,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = [relu](conv2d(relu(x * pre_scale + pre_shift), weight) * scale +
    shift [+ residual]), one kernel; the conv's zero padding applies to the
    activation, as if it had been materialised.

    Args are conv2d_bn_act's, plus pre_scale and pre_shift: (C_in,) tensors
    (used in fp32), the previous layer's BatchNorm as scale and shift. With
    emit_stats the sums are those of the raw conv output.

    Returns (y, sum, sumsq) like conv2d_bn_act. Differentiable in x,
    pre_scale, pre_shift, weight, scale, shift, residual and through the
    statistics.
    """
    op = "conv2d_prologue_bn_act"
    kernel = dispatch.kernel_for(op, x, backend)
    stride, padding, dilation = pair(stride, "stride", op), pair(padding, "padding", op), pair(dilation, "dilation", op)
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"conv2d_prologue_bn_act: `groups` must be a positive int, got {groups!r}")
    check_tensors(x, weight, residual, stride, padding, dilation)
    for what, v in (("pre_scale", pre_scale), ("pre_shift", pre_shift)):
        if v.dim() != 1 or v.numel() != x.shape[1]:
            raise ValueError(f"conv2d_prologue_bn_act: `{what}` must be a 1-D tensor of C_in={x.shape[1]} values "
                             f"(one per input channel), got shape {list(v.shape)}")
    return kernel(x, pre_scale, pre_shift, weight, scale, shift, residual, bool(relu), stride, padding, dilation,
                  groups, bool(emit_stats))
