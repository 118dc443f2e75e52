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

from .. import _backend
from . import finite_bounds, fx_tracing, swapped


def _is_timm_block(m: nn.Module) -> bool:
    # timm.models.resnet's own blocks: other timm families (regnet, ...) have
    # classes of the same names with other children.
    return type(m).__module__ == "timm.models.resnet" and type(m).__name__ in ("BasicBlock", "Bottleneck")


def _inactive(m: nn.Module | None) -> bool:
    return m is None or type(m) is nn.Identity


def _units(block: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if hasattr(block, "conv3"):
        pairs.append((block.conv3, block.bn3))
    return pairs


def fusable(block: nn.Module) -> bool:
    """True when the fused forward computes exactly what timm's forward does."""
    from . import block_paths

    acts = [getattr(block, n, None) for n in ("act1", "act2", "act3") if hasattr(block, n)]
    return (
        all(block_paths.unit_supported(c, b) for c, b in _units(block))
        and block_paths._downsample_supported(block.downsample)
        and all(type(a) is nn.ReLU for a in acts)
        and all(_inactive(getattr(block, n, None)) for n in ("se", "drop_block", "aa"))
        and getattr(block, "drop_path", None) is None
    )


class _FusedTimmBlock(swapped.PicklableSwap):
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
        from . import block_paths

        backend = _backend.resolve(self._backend_choice, x.device)
        if backend == "reference" or not fusable(self):
            return self._library_forward(x)
        unit = block_paths.unit
        finite_bounds.new_scope()
        if hasattr(self, "conv3"):
            out = unit(self.conv1, self.bn1, x, None, True, backend)
            out = unit(self.conv2, self.bn2, out, None, True, backend)
            last = (self.conv3, self.bn3)
        else:
            out = unit(self.conv1, self.bn1, x, None, True, backend)
            last = (self.conv2, self.bn2)
        shortcut = block_paths._shortcut(self, x, backend)
        return unit(last[0], last[1], out, shortcut, True, backend)


def try_convert(block: nn.Module, backend: str | None) -> bool:
    """Fuse a timm block in place; False if it is not one we can fuse exactly."""
    if isinstance(block, _FusedTimmBlock):
        block._backend_choice = backend
        return True
    if not (_is_timm_block(block) and fusable(block)):
        return False
    swapped.swap_class(block, _FusedTimmBlock)
    block._backend_choice = backend
    return True
