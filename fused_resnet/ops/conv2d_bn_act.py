"""conv2d + per-channel scale/shift (folded or batch-statistics BN) + residual
add + ReLU in one Triton kernel, optionally emitting the per-channel sum and
sum of squares of the raw conv output for BatchNorm's batch statistics.

The op fused_resnet::conv2d_bn_act is defined here, from Python: a
torch.library.custom_op whose default implementation computes the contract
with aten (conv_epilogue.aten_path), with a fake kernel, so
torch.compile(fullgraph=True) traces through it as one opaque node, and a
registered autograd formula: the epilogue's backward (ReLU mask, residual
gradient, d(scale), d(shift), the statistics' gradients) composed with
aten.convolution_backward for dgrad and wgrad. The triton backend registers
its CPU and CUDA kernels for it (backends/triton/conv_ops.py).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import dispatch
from .conv_epilogue import (aten_path, check_tensors, epilogue_backward, fake_outputs, pair, save_epilogue_context,
                            saves_output)

_OP = "fused_resnet::conv2d_bn_act"


@torch.library.custom_op(_OP, mutates_args=())
def conv2d_bn_act_op(
    x: torch.Tensor,
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
    return aten_path(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, emit_stats)


conv2d_bn_act_op.register_fake(fake_outputs)


def _setup_context(ctx, inputs, output):
    x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, emit_stats = inputs
    save_epilogue_context(ctx, scale, shift, residual, relu, stride, padding, dilation, groups, emit_stats)
    ctx.save_for_backward(x, weight, scale, output[0] if saves_output(ctx) else None)


def _backward(ctx, gy, gsum, gsumsq):
    x, weight, scale, y = ctx.saved_tensors
    dx, dw, d_scale, d_shift, d_residual = epilogue_backward(ctx, x, weight, scale, y, gy, gsum, gsumsq,
                                                             ctx.needs_input_grad[:5])
    return dx, dw, d_scale, d_shift, d_residual, None, None, None, None, None, None


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)


def conv2d_bn_act(
    x: torch.Tensor,
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
    """y = [relu](conv2d(x, weight) * scale + shift [+ residual]), one kernel.

    Args:
        x: (N, C_in, H, W), float16/bfloat16/float32 for the Triton kernel
            (any float dtype on the aten path); channels_last is the layout
            the kernel reads, anything else is converted first.
        weight: (C_out, C_in / groups, KH, KW), x's dtype.
        scale, shift: optional per-output-channel (C_out,) tensors, used in
            fp32 (folded BN, or BN with known batch statistics).
        residual: optional tensor of the output's shape, added after shift.
        relu: apply ReLU last.
        stride, padding, dilation, groups: as F.conv2d (ints or pairs).
        emit_stats: also return sum and sum of squares over (N, H, W) of the
            raw conv output z, in fp32 (fp64 for fp64), reduced deterministically.
        backend: None (the global choice) or a backend name; every GPU
            backend and the Triton interpreter run the op (the Triton
            kernel where it can run), "reference" and the cpu backend
            F.conv2d + the eager epilogue (dispatch.TABLE).

    Returns (y, sum, sumsq); y is channels_last in x's dtype; sum and sumsq are
    empty when emit_stats is False. Differentiable in x, weight, scale, shift,
    residual and through the statistics.
    """
    kernel = dispatch.kernel_for("conv2d_bn_act", x, backend)
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"conv2d_bn_act: `groups` must be a positive int, got {groups!r}")
    check_tensors(x, weight, residual, stride, padding, dilation)
    return kernel(x, weight, scale, shift, residual, bool(relu), stride, padding, dilation, groups, bool(emit_stats))
