"""The units every backend starts from (dispatch.DEFAULTS): aten's
convolution, then the fused epilogue ops. The `cuda` backend runs exactly
these (its convolutions are cuDNN's, through aten); the other backends run
them wherever their own kernels cannot take the work.

Signatures (dispatch.UNITS):
  eval_unit(conv, bn, x, residual, relu, residual_owned, backend) -> y
      relu?(bn(conv(x)) [+ residual]) for a BN using running statistics;
      BN folded into the conv (cached, fold.py), the add and ReLU fused.
  train_conv(conv, x, backend) -> (z, batch_mean, batch_var)
      the conv of a BN using batch statistics: z, and the per-channel
      statistics of z where the conv computed them (else None, None).
  shortcut_unit(block, conv, bn, out, x, backend) -> y or None
      a block's last unit with its projection shortcut in one kernel; None:
      not here (the block runs the downsample and the unit apart).
  prologue_block(block, x, shortcut, backend) -> y or None
      a training block with each inner BN + ReLU in the next conv's
      prologue (shortcut() computes the block's identity); None: not here.
  prologue_conv(bn, conv, x, backend) -> (z, sum, sumsq) or None
      z = conv(relu(bn(x))) with the BN + ReLU in the conv's prologue and
      the per-channel sums of z; None: not here.
  inference_pool(pool, x, backend) -> y
      the stem's max pool when no gradient is wanted.
  begin_block(backend) -> None
      a block (or the stem) starts: per-block state of a backend resets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from . import fold


def conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def epilogue(y: torch.Tensor, residual: torch.Tensor | None, relu: bool, backend: str) -> torch.Tensor:
    """relu?(y [+ residual]), the add and ReLU in one pass."""
    if residual is not None:
        if relu:
            return ops.add_relu(y, residual.to(y.dtype), backend=backend)
        return y + residual
    return torch.relu(y) if relu else y


def eval_unit(conv_: nn.Conv2d, bn: nn.Module, x: torch.Tensor, residual, relu: bool, residual_owned: bool,
              backend: str) -> torch.Tensor:
    w, b = fold.cached(conv_, bn, "fold", lambda: fold.fold(conv_, bn))
    return epilogue(conv(conv_, x, w, b), residual, relu, backend)


def train_conv(conv_: nn.Conv2d, x: torch.Tensor, backend: str):
    return conv(conv_, x, conv_.weight, conv_.bias), None, None


def no_shortcut_unit(block, conv_, bn, out, x, backend):
    return None


def no_prologue_block(block, x, shortcut, backend):
    return None


def no_prologue_conv(bn, conv_, x, backend):
    return None


def begin_block(backend: str) -> None:
    return None


def inference_pool(pool: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    return pool(x)
