"""The packed 1-bit ReLU mask of a ReLU output: !(y <= 0), one bit per
element in y's memory order (bn_apply's mask layout).

batch_norm_act's backward under set_relu_saves("output") builds the mask it
needs from the saved ReLU output with this op (one read of y, 1/32 of its
bytes written), then runs the fused backward as in "mask" mode.
"""

from __future__ import annotations

import torch

from .. import dispatch

if dispatch.native_loaded():

    @torch.library.register_fake("fused_resnet::relu_mask")
    def _relu_mask_fake(y):
        return y.new_empty(((y.numel() + 7) // 8,), dtype=torch.uint8)


def relu_mask(y: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """uint8 tensor of ceil(numel / 8) bytes: bit i % 8 of byte i // 8 is
    !(y[i] <= 0) for the i-th element of y in its memory order (channels_last
    or contiguous). Not differentiable (a mask)."""
    return dispatch.kernel_for("relu_mask", y, backend)(y.detach())
