"""When a ResNet's forward may let each block write its output over its own
input (oneDNN's sum post-op on CPU, what torch.compile's memory planning
does): fewer allocations and a lower peak."""

from __future__ import annotations

import torch
from torch import nn

from ... import _compat


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def may_overwrite_block_inputs(model: nn.Module, layers: list[nn.Module], x: torch.Tensor,
                               model_input: torch.Tensor, block_types: tuple[type, ...]) -> bool:
    """Whether a ResNet's forward may run the blocks of `layers` itself with
    every block input owned: no gradient, not tracing, only supported fused
    blocks (block_types) in plain nn.Sequential layers, no forward hooks
    anywhere on the chain or the stem (a hook could hold a block's output,
    i.e. the next block's input), and the first block's input `x` not the
    caller's `model_input` (a stem of Identity modules). Whether a unit
    then writes in place is its backend's decision."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if _compat.global_forward_hooks_registered():
        return False
    if x.untyped_storage().data_ptr() == model_input.untyped_storage().data_ptr():
        return False
    if any(_has_hooks(m) for m in (model.conv1, model.bn1, model.relu, model.maxpool)):
        return False
    for layer in layers:
        if type(layer) is not nn.Sequential or _has_hooks(layer):
            return False
        for block in layer:
            if not isinstance(block, block_types) or _has_hooks(block):
                return False
    return True
