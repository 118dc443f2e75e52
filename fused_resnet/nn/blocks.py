"""FusedBasicBlock and FusedBottleneck: torchvision's residual blocks with the
same constructor, attributes (conv1, bn1, ..., downsample.0/.1) and state_dict
keys, whose forward runs the fused path of the chosen backend."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import dispatch
from . import fx_tracing, paths


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding (torchvision's helper, same arguments)."""
    return nn.Conv2d(
        in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups, bias=False,
        dilation=dilation,
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution (torchvision's helper, same arguments)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class _FusedBlockMixin:
    """Backend choice shared by the fused blocks.

    `backend` is None (follow fused_resnet.set_backend / $FUSED_RESNET_BACKEND)
    or a name validated when set. It is not part of the state_dict.

    torch.jit.script compiles reference_forward (torchvision's forward, op
    for op) as the block's forward: the fused path is Python dispatch that
    TorchScript cannot compile, so a scripted model runs eager ops."""

    __jit_unused_properties__ = ["backend"]
    __jit_ignored_attributes__ = ["_backend_choice"]
    _backend_choice = None

    @property
    def backend(self) -> str | None:
        return self._backend_choice

    @backend.setter
    def backend(self, name: str | None) -> None:
        self._backend_choice = None if name is None else dispatch.validate(name)

    def resolved_backend(self, x: torch.Tensor) -> str:
        """The backend this block's first unit runs for input x (auto may
        pick another for other layer classes on a GPU)."""
        return paths.units.resolve(self._backend_choice, x, self.bn1, "inner", self.conv1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.reference_forward(x)
        return self._fused_or_fx_forward(x)

    @torch.jit.unused
    def _fused_or_fx_forward(self, x: torch.Tensor) -> torch.Tensor:
        if fx_tracing.symbolic_tracing():
            return fx_tracing.fused_block(self, x)
        return self._forward_untraced(x)

    @torch.jit.unused
    def _forward_untraced(self, x: torch.Tensor, input_owned: bool = False) -> torch.Tensor:
        if dispatch.runs_eager(self._backend_choice, x.device) or not paths.block.block_supported(self):
            return self.reference_forward(x)
        return paths.block.block_forward(self, x, self._backend_choice, input_owned)

    def _forward_input_owned(self, x: torch.Tensor) -> torch.Tensor:
        """forward(), told that nobody reads x afterwards (a ResNet's own
        chain of blocks, see paths/ownership.py)."""
        return self._forward_untraced(x, input_owned=True)


class FusedBasicBlock(_FusedBlockMixin, nn.Module):
    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self.backend = backend

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's BasicBlock.forward, op for op."""
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class FusedBottleneck(_FusedBlockMixin, nn.Module):
    # The stride sits on the 3x3 conv (conv2), as in torchvision ("ResNet V1.5").
    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.backend = backend

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's Bottleneck.forward, op for op."""
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out
