"""Max pooling without indices: F.max_pool2d's output, for inference.

On CPU aten computes an int64 indices tensor next to every max-pool output
(twice the output's bytes) even when no gradient is wanted; after a ResNet's
stem that tensor sets the forward's peak memory. The native kernel writes the
output alone. It has no autograd formula: where a gradient is wanted (or
there is no native kernel for the device) this is F.max_pool2d.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .. import dispatch
from . import reference

_OP = "fused_resnet::max_pool2d"


def _pooled(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


if dispatch.native_loaded():

    @torch.library.register_fake(_OP)
    def _max_pool2d_fake(x, kernel_size, stride, padding, dilation, ceil_mode):
        torch._check(x.dim() == 4, lambda: "fused_resnet.max_pool2d: `x` must be 4-D")
        h, w = (_pooled(x.shape[2 + a], kernel_size[a], stride[a], padding[a], dilation[a], ceil_mode)
                for a in range(2))
        return x.new_empty((x.shape[0], x.shape[1], h, w)).contiguous(memory_format=reference.memory_format_of(x))


def _pair(v, name: str) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    if len(v) == 1:
        return [v[0], v[0]]
    if len(v) != 2 or not all(isinstance(e, int) for e in v):
        raise ValueError(f"fused_resnet.max_pool2d: `{name}` must be an int or a pair of ints, got {v}")
    return v


def max_pool2d(x: torch.Tensor, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
               padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, ceil_mode: bool = False, *,
               backend: str | None = None) -> torch.Tensor:
    """F.max_pool2d(x, ...) (return_indices=False), without computing indices.

    Args are F.max_pool2d's (stride None or empty means kernel_size); x is a
    4-D floating tensor. Returns a new tensor in x's memory format. Uses the
    native kernel when no gradient is wanted for x, else F.max_pool2d.
    """
    k = _pair(kernel_size, "kernel_size")
    s = k if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _pair(stride, "stride")
    p, d = _pair(padding, "padding"), _pair(dilation, "dilation")
    kernel = dispatch.kernel_for("max_pool2d", x, backend)
    wants_grad = torch.is_grad_enabled() and x.requires_grad
    if wants_grad or x.dim() != 4:
        return F.max_pool2d(x, k, s, p, d, ceil_mode)
    return kernel(x, k, s, p, d, ceil_mode)
