"""convert() support for timm's ResNet family (timm.models.resnet.BasicBlock
and Bottleneck): a block whose extra modules are all inactive (no SE / attention,
no anti-aliasing pool, no DropBlock / DropPath, ReLU activations, plain
BatchNorm2d) is fused in place by swapping its class for a subclass with a
fused forward. Its children, state_dict keys, hooks and attributes are timm's
own; the original forward runs whenever the fused path does not apply.
Anything else is left unchanged (convert() lists it in its warning).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import dispatch
from . import fx_tracing, paths, swapped


def is_timm_block(m: nn.Module) -> bool:
    # timm.models.resnet's own blocks: other timm families (regnet, ...) have
    # classes of the same names with other children.
    return type(m).__module__ == "timm.models.resnet" and type(m).__name__ in ("BasicBlock", "Bottleneck")


def _inactive(m: nn.Module | None) -> bool:
    return m is None or type(m) is nn.Identity


def fusable(block: nn.Module) -> bool:
    """True when the fused forward computes exactly what timm's forward does."""
    acts = [getattr(block, n, None) for n in ("act1", "act2", "act3") if hasattr(block, n)]
    return (
        paths.block.block_supported(block)
        and all(type(a) is nn.ReLU for a in acts)
        and all(_inactive(getattr(block, n, None)) for n in ("se", "drop_block", "aa"))
        and getattr(block, "drop_path", None) is None
    )


class FusedTimmBlock(swapped.PicklableSwap):
    """Mixed in front of timm's block class; see the module docstring (and
    swapped.py for pickling and scripting)."""

    __jit_ignored_attributes__ = ["_backend_choice"]
    _backend_choice = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._library_forward(x)
        return self._fused_or_fx_forward(x)

    @torch.jit.unused
    def _fused_or_fx_forward(self, x: torch.Tensor) -> torch.Tensor:
        if fx_tracing.symbolic_tracing():
            return fx_tracing.fused_block(self, x)
        return self._forward_untraced(x)

    @torch.jit.unused
    def _forward_untraced(self, x: torch.Tensor) -> torch.Tensor:
        if dispatch.runs_eager(self._backend_choice, x.device) or not fusable(self):
            return self._library_forward(x)
        return paths.block.block_forward(self, x, self._backend_choice)


def try_convert(block: nn.Module, backend: str | None) -> bool:
    """Fuse a timm block in place; False if it is not one we can fuse exactly."""
    if isinstance(block, FusedTimmBlock):
        block._backend_choice = backend
        return True
    if not (is_timm_block(block) and fusable(block)):
        return False
    swapped.swap_class(block, FusedTimmBlock)
    block._backend_choice = backend
    return True
