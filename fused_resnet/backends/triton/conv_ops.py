"""The triton backend's kernels for the conv ops of fused_resnet.ops
(conv2d_bn_act, conv2d_bias_act_shortcut, conv2d_prologue_bn_act,
conv2d_dgrad_prologue), registered per device with torch.library: the
Triton kernel where it runs (kernel_runs), else the op's default
implementation (aten). Importing this module imports no Triton: launch.py
is imported on the first launch, so that TRITON_INTERPRET is read by then.
"""

from __future__ import annotations

import torch

from ... import dispatch
from ...ops import reference
from ...ops.conv2d_bias_act_shortcut import conv2d_bias_act_shortcut_op
from ...ops.conv2d_bn_act import conv2d_bn_act_op
from ...ops.conv2d_dgrad_prologue import conv2d_dgrad_prologue_op
from ...ops.conv2d_prologue_bn_act import conv2d_prologue_bn_act_op
from ...ops.conv_epilogue import aten_path

SUPPORTED_DTYPES = {"cuda": (torch.float16, torch.bfloat16, torch.float32),
                    # The interpreter computes bf16 dots wrongly (NOTES.md).
                    "cpu": (torch.float16, torch.float32)}


def kernel_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the Triton kernel (rather than aten) runs for a tensor of this
    device type and dtype: a GPU with Triton, or the interpreter on CPU."""
    av = dispatch.availability()
    if device_type == "cuda":
        ok = av["triton"].available
    elif device_type == "cpu":
        ok = dispatch.triton_interpreter_on() and av["triton-interpreter"].available
    else:
        return False
    return ok and dtype in SUPPORTED_DTYPES[device_type]


def _launch():
    from . import launch

    return launch


def _conv2d_bn_act(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, emit_stats):
    if kernel_runs(x.device.type, x.dtype):
        return _launch().conv2d_bn_act(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups,
                                       emit_stats)
    return aten_path(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, emit_stats)


def _shortcut(x, weight, bias, x2, weight2, stride2, relu, stride, padding, dilation, groups):
    if kernel_runs(x.device.type, x.dtype):
        y, _, _ = _launch().conv2d_bn_act(x, weight, None, bias, None, relu, stride, padding, dilation, groups, False,
                                          x2=x2, weight2=weight2, stride2=stride2)
        return y
    y = reference.conv2d_bias_act_shortcut(x, weight, bias, x2, weight2, stride2, relu, stride, padding, dilation,
                                           groups)
    return y.contiguous(memory_format=torch.channels_last)


def _prologue(x, pre_scale, pre_shift, weight, scale, shift, residual, relu, stride, padding, dilation, groups,
              emit_stats):
    if kernel_runs(x.device.type, x.dtype):
        return _launch().conv2d_bn_act(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups,
                                       emit_stats, pre_scale=pre_scale, pre_shift=pre_shift)
    a = reference.bn_relu_prologue(x, pre_scale, pre_shift)
    return aten_path(a, weight, scale, shift, residual, relu, stride, padding, dilation, groups, emit_stats)


def _dgrad(dz, weight, x_prev, pre_scale, pre_shift, padding, dilation, groups):
    if kernel_runs(x_prev.device.type, x_prev.dtype):
        return _launch().conv2d_dgrad_prologue(dz, weight, x_prev, pre_scale, pre_shift, padding, dilation, groups)
    dx, dps, dpt = reference.conv2d_dgrad_prologue(dz, weight, x_prev, pre_scale, pre_shift, list(padding),
                                                   list(dilation), groups)
    return dx.contiguous(memory_format=torch.channels_last), dps, dpt


for _op, _kernel in ((conv2d_bn_act_op, _conv2d_bn_act), (conv2d_bias_act_shortcut_op, _shortcut),
                     (conv2d_prologue_bn_act_op, _prologue), (conv2d_dgrad_prologue_op, _dgrad)):
    _op.register_kernel(("cpu", "cuda"))(_kernel)
