"""The cpu backend's inference unit: oneDNN's fused convolution (aten's
private mkldnn ops, through _compat) with BatchNorm folded into prepacked
weights and the bias, residual add and ReLU as post-ops: one primitive per
unit, and, when the residual is the unit's own to overwrite, no output
allocation at all (oneDNN's sum post-op).

oneDNN's ReLU post-op maps NaN to 0, so it is used only where no
pre-activation can be non-finite (finite_bounds.py); elsewhere the
convolution runs bare and the ReLU after it, eager's semantics. Where
oneDNN's ops cannot serve (another dtype, a gradient wanted, autocast,
torch.compile or torch.jit.trace) the default unit runs (backends/units.py).
"""

from __future__ import annotations

import math

import torch

from ... import _compat, ops
from .. import fold, units
from . import finite_bounds


def usable(x: torch.Tensor, conv, bn) -> bool:
    """oneDNN's fused conv post-ops (private aten ops, no autograd): fp32, no
    gradient wanted, not under autocast, torch.compile or torch.jit.trace
    (whose tracer cannot record their Scalar?[] argument)."""
    return (
        not torch.compiler.is_compiling()  # first: dynamo cannot trace the mkldnn query below
        and not torch.jit.is_tracing()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and conv.weight.dtype == torch.float32
        and _compat.mkldnn_fused_conv_available()
        and not fold.needs_grad(conv, bn)
        and not x.requires_grad
        and not torch.is_autocast_enabled("cpu")
        and x.dim() == 4
        and x.shape[0] > 0
    )


def eval_unit(conv, bn, x: torch.Tensor, residual, relu: bool, residual_owned: bool, backend: str):
    if not usable(x, conv, bn):
        return units.eval_unit(conv, bn, x, residual, relu, residual_owned, backend)

    def pack():
        w, b = fold.fold(conv, bn)
        packed = _compat.mkldnn_prepack_weight(w, conv.padding, conv.stride, conv.dilation, conv.groups, x.shape)
        return packed, b, finite_bounds.weight_bounds(w, b)

    w, b, (w_norm, b_max) = fold.cached(conv, bn, "mkldnn", pack, extra=(tuple(x.shape),))
    pre = finite_bounds.pre_activation(x, residual, w_norm, b_max)
    exact_relu = pre < finite_bounds.NO_OVERFLOW
    args = (conv.padding, conv.stride, conv.dilation, conv.groups, "relu" if relu and exact_relu else None)
    if residual is None:
        y = _compat.mkldnn_conv(x, w, b, *args)
    else:
        fmt = _suggest_format(x)
        if residual_owned and _can_accumulate_into(residual, x, fmt):
            # oneDNN's "sum" post-op: the result is written over the residual,
            # which nobody else reads; no output allocation, and one tensor
            # less alive at the block's peak.
            y = _compat.mkldnn_conv_add_(residual, x, w, b, *args)
        else:
            y = _compat.mkldnn_conv_add(x, residual.contiguous(memory_format=fmt), w, b, *args)
    if relu and not exact_relu:
        y = y.relu_()  # y is this unit's own output (or the residual it may overwrite)
    finite_bounds.record(y, pre if exact_relu else math.inf)
    return y


def _can_accumulate_into(residual: torch.Tensor, x: torch.Tensor, fmt: torch.memory_format) -> bool:
    return (
        _compat.mkldnn_inplace_binary_available()
        and not torch.is_grad_enabled()
        and residual.dtype == x.dtype
        and residual.is_contiguous(memory_format=fmt)
        and residual.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        # An inference tensor may only be written inside inference mode.
        and (torch.is_inference_mode_enabled() or not residual.is_inference())
    )


def _suggest_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if ops.reference.memory_format_of(x) == torch.channels_last else torch.contiguous_format
