"""One unit: relu?(bn(conv(x)) [+ residual]) with eager's semantics.

A BN using running statistics (eval, FrozenBatchNorm2d) runs the backend's
eval_unit (BN folded into the conv); one using batch statistics runs the
backend's train_conv (the conv, with the statistics where the conv computes
them) and then the BatchNorm + add + ReLU in one pass (bn_modules.bn_act).
"""

from __future__ import annotations

import torch
from torch import nn

from ... import dispatch
from ...backends import bn_modules


def resolve(choice: str | None, x: torch.Tensor, bn: nn.Module, role: str, conv: nn.Module) -> str:
    """The backend of one unit: `choice` (a module's, None = the global one)
    resolved for x's device and, for auto on a GPU, the unit's layer class."""
    layer = None
    if x.device.type == "cuda":
        mode = "train" if bn_modules.uses_batch_stats(bn) else "inference"
        layer = dispatch.layer_class(mode, role, conv.kernel_size, conv.stride)
    return dispatch.resolve(choice, x.device, layer)


def unit(conv: nn.Module, bn: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, relu: bool, backend: str,
         residual_owned: bool = False) -> torch.Tensor:
    """relu?(bn(conv(x)) [+ residual]) on a resolved `backend`.
    residual_owned: nobody reads `residual` after this call, so an inference
    unit may write its result over it."""
    if x.dim() != 4:  # nn.BatchNorm2d's own check and text
        raise ValueError(f"expected 4D input (got {x.dim()}D input)")
    if not x.is_floating_point():
        raise TypeError(f"fused_resnet: the input must be a floating-point tensor, got {x.dtype}")
    device = x.device.type
    if bn_modules.uses_batch_stats(bn):
        z, batch_mean, batch_var = dispatch.kernel("train_conv", backend, device)(conv, x, backend)
        return bn_modules.bn_act(bn, z, residual, relu, backend, batch_mean, batch_var)
    return dispatch.kernel("eval_unit", backend, device)(conv, bn, x, residual, relu, residual_owned, backend)
