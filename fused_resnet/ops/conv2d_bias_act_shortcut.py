"""conv2d_bias_act_shortcut: a residual block's last conv (BN folded) with
its projection shortcut (the downsample 1x1 conv, BN folded) as a second GEMM
accumulated into the same tile: one kernel, one write, no shortcut tensor.
Inference only.

The op fused_resnet::conv2d_bias_act_shortcut (default implementation:
the reference with aten, channels_last; fake kernel; no autograd: where a
gradient is wanted the wrapper computes the same contract with
differentiable aten ops). The triton backend registers its kernels
(backends/triton/conv_ops.py).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import dispatch
from . import conv_args, reference
from .conv_epilogue import check_tensors, out_hw

_SC_OP = "fused_resnet::conv2d_bias_act_shortcut"


@torch.library.custom_op(_SC_OP, mutates_args=())
def conv2d_bias_act_shortcut_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    x2: torch.Tensor,
    weight2: torch.Tensor,
    stride2: Sequence[int],
    relu: bool,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    y = reference.conv2d_bias_act_shortcut(x, weight, bias, x2, weight2, stride2, relu, stride, padding, dilation,
                                           groups)
    return y.contiguous(memory_format=torch.channels_last)


@conv2d_bias_act_shortcut_op.register_fake
def _shortcut_fake(x, weight, bias, x2, weight2, stride2, relu, stride, padding, dilation, groups):
    torch._check(x.dim() == 4 and weight.dim() == 4 and x2.dim() == 4 and weight2.dim() == 4,
                 lambda: "conv2d_bias_act_shortcut: `x`, `weight`, `x2` and `weight2` must be 4-D")
    oh, ow = out_hw(x.shape, weight.shape, stride, padding, dilation)
    return torch.empty((x.shape[0], weight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def conv2d_bias_act_shortcut(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    x2: torch.Tensor,
    weight2: torch.Tensor,
    stride2=1,
    relu: bool = True,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """y = [relu](conv2d(x, weight) + conv1x1(x2, weight2, stride2) + bias),
    inference only: a residual block's last conv (BN folded into `weight`)
    with its projection shortcut (the downsample conv, its BN folded into
    `weight2`) computed as a second GEMM into the same accumulator, and one
    bias, the two folded biases summed. One kernel, one write.

    Args:
        x: (N, C_in, H, W), the last conv's input; float16/float32 (bfloat16 on
            a GPU) for the Triton kernel.
        weight: (C_out, C_in / groups, KH, KW), x's dtype.
        bias: optional (C_out,), used in fp32.
        x2: (N, C2, H2, W2), the block input, x's dtype.
        weight2: (C_out, C2, 1, 1), x's dtype.
        stride2: the shortcut's stride (no padding, one group); its output
            must have the main conv's shape.
        relu, stride, padding, dilation, groups: as conv2d_bn_act.
        backend: None (the global choice) or a backend name
            (dispatch.TABLE, as conv2d_bn_act).

    Returns y, channels_last in x's dtype. There is no backward: when
    autograd is recording and an input requires grad, the unfused,
    differentiable reference (reference.conv2d_bias_act_shortcut) runs.
    """
    op = "conv2d_bias_act_shortcut"
    kernel = dispatch.kernel_for(op, x, backend)
    stride, padding, dilation = (conv_args.pair(stride, "stride", op), conv_args.pair(padding, "padding", op),
                                 conv_args.pair(dilation, "dilation", op))
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: `groups` must be a positive int, got {groups!r}")
    check_tensors(x, weight, None, stride, padding, dilation)
    oh, ow = out_hw(x.shape, weight.shape, stride, padding, dilation)
    stride2 = list(conv_args.check_shortcut(x, x2, weight2, stride2, (x.shape[0], weight.shape[0], oh, ow), op))
    if bias is not None and bias.numel() != weight.shape[0]:
        raise ValueError(f"{op}: `bias` must have {weight.shape[0]} elements (one per output channel), "
                         f"got {bias.numel()}")
    if _wants_grad(x, weight, bias, x2, weight2):
        return reference.conv2d_bias_act_shortcut(x, weight, bias, x2, weight2, stride2, bool(relu), stride,
                                                  padding, dilation, groups)
    return kernel(x, weight, bias, x2, weight2, stride2, bool(relu), stride, padding, dilation, groups)
