"""The fused forward paths of the blocks and the stem, per backend.

Eval-mode blocks fold BN into the convolutions; training-mode blocks run
conv -> batch statistics -> fused BN apply (+ residual) + ReLU. Everything
here goes through fused_resnet.ops; nothing below this layer knows modules.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops


def _conv_bn_relu(conv: nn.Module, bn: nn.Module, x: torch.Tensor, relu: bool) -> torch.Tensor:
    out = bn(conv(x))
    return torch.relu(out) if relu else out


def block_forward(block: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """Forward of a FusedBasicBlock / FusedBottleneck on `backend`."""
    identity = block.downsample(x) if block.downsample is not None else x
    if hasattr(block, "conv3"):
        out = _conv_bn_relu(block.conv1, block.bn1, x, True)
        out = _conv_bn_relu(block.conv2, block.bn2, out, True)
        out = _conv_bn_relu(block.conv3, block.bn3, out, False)
    else:
        out = _conv_bn_relu(block.conv1, block.bn1, x, True)
        out = _conv_bn_relu(block.conv2, block.bn2, out, False)
    return ops.add_relu(out, identity, backend=backend)


def stem_forward(model: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """conv1 -> bn1 -> relu of a ResNet on `backend`."""
    return _conv_bn_relu(model.conv1, model.bn1, x, True)
