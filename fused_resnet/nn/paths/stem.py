"""A ResNet's stem (conv1 -> bn1 -> relu, one unit) and its max pool."""

from __future__ import annotations

import torch
from torch import nn

from ... import dispatch
from ...backends import bn_modules
from . import units


def stem_forward(model: nn.Module, x: torch.Tensor, choice: str | None) -> torch.Tensor:
    """conv1 -> bn1 -> relu of a ResNet, fused where the units reproduce it."""
    if not (bn_modules.unit_supported(model.conv1, model.bn1) and isinstance(model.relu, nn.ReLU)):
        return model.relu(model.bn1(model.conv1(x)))
    backend = units.resolve(choice, x, model.bn1, "stem", model.conv1)
    dispatch.kernel("begin_block", backend, x.device.type)(backend)
    return units.unit(model.conv1, model.bn1, x, None, True, backend)


def pool_forward(model: nn.Module, x: torch.Tensor, choice: str | None) -> torch.Tensor:
    """model.maxpool(x), through the backend's inference pool when no
    gradient is wanted."""
    if torch.is_grad_enabled() and x.requires_grad:
        return model.maxpool(x)
    backend = dispatch.resolve(choice, x.device)
    return dispatch.kernel("inference_pool", backend, x.device.type)(model.maxpool, x, backend)
