"""The fused backward of a stride-1 prologue conv as a custom op:
fused_resnet::conv2d_dgrad_prologue(dz, weight, x_prev, pre_scale, pre_shift,
padding, dilation, groups) -> (dx_prev, d_pre_scale, d_pre_shift), see
reference.conv2d_dgrad_prologue for the contract and
launch.conv2d_dgrad_prologue for the kernel.

An op (with a fake kernel) rather than a plain call because
conv2d_prologue_bn_act's backward runs it: under torch.compile that backward
is traced with fake tensors, which a Triton launch cannot take. Its default
implementation is the reference; the triton backend registers its kernels
(backends/triton/conv_ops.py). No autograd of its own (it is itself a
gradient; double backward through the prologue is not supported).
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import conv_args, reference

_OP = "fused_resnet::conv2d_dgrad_prologue"


@torch.library.custom_op(_OP, mutates_args=())
def conv2d_dgrad_prologue_op(
    dz: torch.Tensor,
    weight: torch.Tensor,
    x_prev: torch.Tensor,
    pre_scale: torch.Tensor,
    pre_shift: torch.Tensor,
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dps, dpt = reference.conv2d_dgrad_prologue(dz, weight, x_prev, pre_scale, pre_shift, list(padding),
                                                   list(dilation), groups)
    return dx.contiguous(memory_format=torch.channels_last), dps, dpt


@conv2d_dgrad_prologue_op.register_fake
def _dgrad_fake(dz, weight, x_prev, pre_scale, pre_shift, padding, dilation, groups):
    c = x_prev.shape[1]
    dx = torch.empty_like(x_prev, memory_format=torch.channels_last)
    return dx, x_prev.new_empty((c,), dtype=torch.float32), x_prev.new_empty((c,), dtype=torch.float32)


def conv2d_dgrad_prologue(dz, weight, x_prev, pre_scale, pre_shift, padding, dilation, groups: int = 1):
    """(dx_prev, d_pre_scale, d_pre_shift) of z = conv2d(relu(x_prev *
    pre_scale + pre_shift), weight) with stride 1, given dz = dL/dz: one
    Triton kernel where it runs (d(activation) never written), else the
    reference. padding and dilation: ints or pairs."""
    return torch.ops.fused_resnet.conv2d_dgrad_prologue(
        dz, weight, x_prev, pre_scale, pre_shift, conv_args.pair(padding, "padding", "conv2d_dgrad_prologue"),
        conv_args.pair(dilation, "dilation", "conv2d_dgrad_prologue"), int(groups))
