"""The cudnn backend's units: inference as one cuDNN graph per unit (conv +
folded BN bias + residual + ReLU, graphs.conv_bias_act), training convs as a
conv + statistics graph (graphs.conv_genstats: z and its per-channel sums),
differentiable through cuDNN's dgrad/wgrad graphs. Where a graph cannot
take the conv (a conv bias in training, padding given as a string, a dtype
cuDNN's graphs do not run), the default units run (backends/units.py)."""

from __future__ import annotations

import torch

from .. import bn_modules, fold, units
from . import graphs


def eval_unit(conv, bn, x: torch.Tensor, residual, relu: bool, residual_owned: bool, backend: str):
    if x.device.type != "cuda":
        return units.eval_unit(conv, bn, x, residual, relu, residual_owned, backend)
    w, b = fold.cached(conv, bn, "fold", lambda: fold.fold(conv, bn))
    return graphs.conv_bias_act(x, w, b, residual, relu, conv.stride, conv.padding, conv.dilation, conv.groups)


def _genstats_operands(conv, x: torch.Tensor):
    """(x, weight) for graphs.conv_genstats when its graph can run this conv
    (a CUDA tensor, the backend built, no conv bias, numeric padding,
    fp16/bf16/fp32 with x's and the weight's dtypes agreeing after
    autocast's cast), else None."""
    if (x.device.type != "cuda" or conv.bias is not None or isinstance(conv.padding, str) or x.shape[0] == 0
            or not graphs.built()):
        return None
    w = conv.weight
    if torch.is_autocast_enabled("cuda"):
        # What autocast does for F.conv2d: both operands in the autocast dtype
        # (the custom op itself has no autocast rule).
        dt = torch.get_autocast_dtype("cuda")
        if x.dtype != torch.float64 and w.dtype != torch.float64:
            x, w = x.to(dt), w.to(dt)
    if x.dtype != w.dtype or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    return x, w


def train_conv(conv, x: torch.Tensor, backend: str):
    operands = _genstats_operands(conv, x)
    if operands is None:
        return units.train_conv(conv, x, backend)
    z, s, ss = graphs.conv_genstats(*operands, None, None, False, conv.stride, conv.padding, conv.dilation,
                                    conv.groups)
    return (z, *bn_modules.stats_from_sums(z, s, ss))
