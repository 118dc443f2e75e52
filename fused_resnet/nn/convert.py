"""convert(): swap the residual blocks of an existing torchvision ResNet for
fused ones, in place, keeping parameters, buffers, device, dtype, memory
format and train/eval mode (the same parameter objects are reused)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import dispatch
from . import swapped, timm_blocks
from .blocks import FusedBasicBlock, FusedBottleneck

_BASIC_ATTRS = ("conv1", "bn1", "relu", "conv2", "bn2", "downsample")
_BOTTLENECK_ATTRS = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu", "downsample")


def _is_torchvision_block(m: nn.Module, cls_name: str, attrs: tuple[str, ...]) -> bool:
    # Exactly torchvision's block (by class name and children): a subclass may
    # change forward, and we must never alter what a model computes.
    return (
        type(m).__name__ == cls_name
        and type(m).__module__.startswith("torchvision")
        and set(n for n, _ in m.named_children()) <= set(attrs)
        and all(hasattr(m, a) for a in attrs)
    )


def _swap_block(m: nn.Module, cls: type[nn.Module], backend: str | None) -> nn.Module:
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, child in m.named_children():
        new.add_module(name, child)
    if m.downsample is None:
        new.downsample = None
    new.stride = m.stride
    new.train(m.training)
    new.backend = backend
    return new


class FusedStemMixin(swapped.PicklableSwap):
    """Mixed into a converted torchvision ResNet's class so its stem
    (conv1 -> bn1 -> relu) runs fused too; isinstance checks still hold
    (see swapped.py for pickling and scripting)."""

    __jit_ignored_attributes__ = ["_backend_choice"]
    _backend_choice = None

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._library_forward_impl(x)
        return self._fused_forward_impl(x)

    @torch.jit.unused
    def _fused_forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        from .resnet import fused_forward

        return fused_forward(self, x)


def _with_fused_stem(model: nn.Module, backend: str | None) -> None:
    if isinstance(model, FusedStemMixin):
        model._backend_choice = backend
        return
    if type(model).__name__ != "ResNet" or not all(
        hasattr(model, a) for a in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer4", "avgpool", "fc")
    ):
        return
    swapped.swap_class(model, FusedStemMixin)
    model._backend_choice = backend


def convertible(m: nn.Module) -> bool:
    """Whether convert() would fuse module `m` itself: a torchvision
    BasicBlock/Bottleneck, or a timm one it can fuse exactly, not fused yet."""
    if _is_torchvision_block(m, "BasicBlock", _BASIC_ATTRS) or _is_torchvision_block(m, "Bottleneck",
                                                                                      _BOTTLENECK_ATTRS):
        return True
    return (timm_blocks.is_timm_block(m) and not isinstance(m, timm_blocks.FusedTimmBlock)
            and timm_blocks.fusable(m))


def convert(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Swap every torchvision BasicBlock/Bottleneck of `model` for
    FusedBasicBlock/FusedBottleneck, in place, and return `model`.

    The new blocks hold the same conv/BN modules (so parameters, buffers,
    state_dict keys, device, dtype and memory format are unchanged). A
    torchvision ResNet also gets its stem fused. A bare block is the one
    exception to "in place": its fused twin (sharing parameters) is returned. Blocks of other libraries
    are left as they are, with a warning listing them.

    Args:
        model: a torchvision ResNet (or any module containing its blocks).
        backend: None (follow fused_resnet.set_backend) or a backend name.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() expects an nn.Module, got {type(model).__name__}")
    if backend is not None:
        backend = dispatch.validate(backend)
    skipped: list[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}{name}"
            if isinstance(child, (FusedBasicBlock, FusedBottleneck)):
                child.backend = backend
            elif _is_torchvision_block(child, "BasicBlock", _BASIC_ATTRS):
                setattr(parent, name, _swap_block(child, FusedBasicBlock, backend))
            elif _is_torchvision_block(child, "Bottleneck", _BOTTLENECK_ATTRS):
                setattr(parent, name, _swap_block(child, FusedBottleneck, backend))
            elif timm_blocks.try_convert(child, backend):  # timm's blocks are fused in place
                pass
            else:
                if type(child).__name__ in ("BasicBlock", "Bottleneck"):
                    skipped.append(f"{path} ({type(child).__module__}.{type(child).__name__})")
                visit(child, path + ".")

    if isinstance(model, (FusedBasicBlock, FusedBottleneck)):
        model.backend = backend
        return model
    # A bare block cannot be swapped in place: return its fused twin, which
    # shares every parameter and buffer with it.
    if _is_torchvision_block(model, "BasicBlock", _BASIC_ATTRS):
        return _swap_block(model, FusedBasicBlock, backend)
    if _is_torchvision_block(model, "Bottleneck", _BOTTLENECK_ATTRS):
        return _swap_block(model, FusedBottleneck, backend)
    from .resnet import ResNet

    visit(model, "")
    if isinstance(model, ResNet):
        model.set_backend(backend)
    else:
        _with_fused_stem(model, backend)
    if skipped:
        warnings.warn(
            "fused_resnet.convert: left these blocks unchanged (not a block type we can fuse exactly): "
            + ", ".join(skipped),
            stacklevel=2,
        )
    return model
