"""A residual block's fused forward (FusedBasicBlock, FusedBottleneck and
timm's blocks): its units, its shortcut, and the block-level fusions a
backend may have (a training block with BN + ReLU in the next conv's
prologue; the last conv with the projection shortcut as a second GEMM).
Anything the units cannot reproduce exactly (another norm layer, a non-zero
padding mode, a block with extra modules) runs the block's eager forward.
"""

from __future__ import annotations

import torch
from torch import nn

from ... import dispatch
from ...backends import bn_modules
from . import units


def unit_pairs(block: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(conv, bn) of each unit of the main path, in order."""
    pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if hasattr(block, "conv3"):
        pairs.append((block.conv3, block.bn3))
    return pairs


def downsample_supported(ds: nn.Module | None) -> bool:
    return ds is None or (isinstance(ds, nn.Sequential) and len(ds) == 2
                          and bn_modules.unit_supported(ds[0], ds[1]))


def block_supported(block: nn.Module) -> bool:
    return (all(bn_modules.unit_supported(c, b) for c, b in unit_pairs(block))
            and downsample_supported(block.downsample) and isinstance(getattr(block, "relu", nn.ReLU()), nn.ReLU))


def shortcut(block: nn.Module, x: torch.Tensor, choice: str | None) -> torch.Tensor:
    """The block's identity: x, or its downsample conv + BN as a unit."""
    ds = block.downsample
    if ds is None:
        return x
    return units.unit(ds[0], ds[1], x, None, False, units.resolve(choice, x, ds[1], "downsample", ds[0]))


def block_forward(block: nn.Module, x: torch.Tensor, choice: str | None, input_owned: bool = False) -> torch.Tensor:
    """The fused forward of a residual block whose units are block_supported,
    each unit on the backend `choice` resolves to for it. input_owned: nobody
    reads `x` after this block (ownership.py), so an identity shortcut may be
    overwritten with the block's output; a downsample's output always may."""
    pairs = unit_pairs(block)
    (conv1, bn1), (last_conv, last_bn) = pairs[0], pairs[-1]
    backend = units.resolve(choice, x, bn1, "inner", conv1)
    device = x.device.type
    fused = dispatch.kernel("prologue_block", backend, device)(block, x, lambda: shortcut(block, x, choice), backend)
    if fused is not None:
        return fused
    dispatch.kernel("begin_block", backend, device)(backend)
    out = x
    for conv, bn in pairs[:-1]:
        out = units.unit(conv, bn, out, None, True, units.resolve(choice, out, bn, "inner", conv))
    backend = units.resolve(choice, out, last_bn, "last", last_conv)
    fused = dispatch.kernel("shortcut_unit", backend, device)(block, last_conv, last_bn, out, x, backend)
    if fused is not None:
        return fused
    identity = shortcut(block, x, choice)
    owned = input_owned or block.downsample is not None
    return units.unit(last_conv, last_bn, out, identity, True, backend, residual_owned=owned)
