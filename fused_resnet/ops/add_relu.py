"""Fused residual add + ReLU: y = relu(x + residual), one pass over memory."""

from __future__ import annotations

import torch

from .. import dispatch
from . import reference

if dispatch.native_loaded():

    @torch.library.register_fake("fused_resnet::add_relu")
    def _add_relu_fake(x, residual):
        torch._check(x.shape == residual.shape, lambda: "fused_resnet.add_relu: `residual` must have x's shape")
        return torch.empty_like(x, memory_format=reference.memory_format_of(x))

    def _add_relu_setup(ctx, inputs, output):
        ctx.save_for_backward(output)

    def _add_relu_backward(ctx, grad):
        (y,) = ctx.saved_tensors
        g = torch.where(y > 0, grad, torch.zeros_like(grad))
        return g, g

    torch.library.register_autograd(
        "fused_resnet::add_relu", _add_relu_backward, setup_context=_add_relu_setup
    )


def add_relu(x: torch.Tensor, residual: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """relu(x + residual) in one pass.

    Args:
        x: floating tensor (fp32, fp16, bf16 or fp64), any shape.
        residual: tensor of x's shape, dtype and device.
        backend: None (the global choice), or a backend name; "reference"
            forces the plain-PyTorch definition.

    Returns a new tensor in x's memory format. Differentiable in both inputs.
    """
    return dispatch.kernel_for("add_relu", x, backend)(x, residual)
