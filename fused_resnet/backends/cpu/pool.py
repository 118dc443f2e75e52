"""The cpu backend's inference max pool: ops.max_pool2d, which skips the
int64 indices aten computes beside the output. Where a gradient is wanted,
or the pool is not a plain nn.MaxPool2d without hooks, aten's pool runs."""

from __future__ import annotations

import torch
from torch import nn

from ... import _compat, ops
from . import finite_bounds


def inference_pool(pool: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    if (type(pool) is not nn.MaxPool2d or pool.return_indices or pool._forward_hooks or pool._forward_pre_hooks
            or _compat.global_forward_hooks_registered() or (torch.is_grad_enabled() and x.requires_grad)):
        return pool(x)
    y = ops.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                       backend=backend)
    finite_bounds.carry(x, y)  # a max pool's values are some of its input's
    return y
