"""Fused building blocks for people who write their own networks.

    ConvBNAct(in, out, k, stride)      conv -> BatchNorm -> [ReLU] as one fused unit;
                                       forward(x, residual=None) adds a residual
                                       before the ReLU in the same unit
    ResidualBlock(main, shortcut)      relu(main(x) + shortcut(x)); when main ends in
                                       a ConvBNAct(act=False), its BN, the add and
                                       the ReLU run as that unit's epilogue
    PreActBlock(in, out, stride)       ResNet v2: BN -> ReLU -> conv, twice, + shortcut;
                                       BN + ReLU fused (the next conv's prologue on
                                       triton with the "prologue" fusion on)

The d2l ResNet-18 (convs with bias, a 1x1 conv shortcut without BatchNorm):

    from torch import nn
    from fused_resnet.nn import ConvBNAct, ResidualBlock

    def block(cin, cout, stride=1):
        main = nn.Sequential(ConvBNAct(cin, cout, 3, stride, bias=True),
                             ConvBNAct(cout, cout, 3, bias=True, act=False))
        shortcut = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else None
        return ResidualBlock(main, shortcut)

    def stage(cin, cout, first=False):
        return nn.Sequential(block(cin, cout, 1 if first else 2), block(cout, cout))

    net = nn.Sequential(
        ConvBNAct(1, 64, 7, 2, bias=True), nn.MaxPool2d(3, 2, 1),
        stage(64, 64, first=True), stage(64, 128), stage(128, 256), stage(256, 512),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))

Each module's state_dict holds its children's (`conv.weight`, `bn.running_mean`,
...), it runs on every backend (`backend=` per module, None = the global
choice) and in train and eval mode with eager's semantics, and torch.fx
traces it as one call (torchvision's feature extractors keep it fused).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx
from torch import nn

from .. import dispatch
from .chains import run_add_relu, run_bn_act, run_unit

__all__ = ["FusedModule", "ConvBNAct", "ResidualBlock", "PreActBlock"]

torch.fx.wrap("run_unit")
torch.fx.wrap("run_bn_act")
torch.fx.wrap("run_add_relu")


class FusedModule(nn.Module):
    """Base of the composable modules: a `backend` (None = the global
    choice), validated when set, not part of the state_dict. fuse() leaves
    these modules as they are."""

    _backend_choice: str | None = None

    @property
    def backend(self) -> str | None:
        return self._backend_choice

    @backend.setter
    def backend(self, name: str | None) -> None:
        self._backend_choice = None if name is None else dispatch.validate(name)


class ConvBNAct(FusedModule):
    """relu?(bn(conv(x)) [+ residual]): nn.Conv2d + a BatchNorm (children
    `conv`, `bn`) run as one fused unit.

    Args: as nn.Conv2d (padding None = "same" for odd kernels at stride 1,
    kernel_size // 2 in general), `bias` (default False; a conv bias before
    BatchNorm is cancelled by the batch mean in training, kept in the running
    mean and the eval fold, as eager does), `act` (ReLU or none),
    `norm_layer` (default nn.BatchNorm2d), `backend`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1, bias: bool = False,
                 act: bool = True, norm_layer: Callable[[int], nn.Module] | None = None,
                 backend: str | None = None) -> None:
        super().__init__()
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=bias)
        self.bn = (norm_layer or nn.BatchNorm2d)(out_channels)
        self.act = bool(act)
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return run_unit(self.conv, self.bn, x, residual, self.act, None, self._backend_choice)

    def extra_repr(self) -> str:
        return f"act={'relu' if self.act else 'none'}"


class ResidualBlock(FusedModule):
    """relu(main(x) + shortcut(x)) (no ReLU with act=False).

    `main` is any module; when it is an nn.Sequential whose last module is a
    ConvBNAct(act=False), that unit takes the shortcut as its residual, so
    its BN, the add and the ReLU are one fused epilogue. `shortcut` is None
    (identity) or any module (a 1x1 conv, a ConvBNAct(act=False), ...)."""

    def __init__(self, main: nn.Module, shortcut: nn.Module | None = None, act: bool = True,
                 backend: str | None = None) -> None:
        super().__init__()
        self.main = main
        self.shortcut = shortcut
        self.act = bool(act)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        main = self.main
        if isinstance(main, nn.Sequential) and len(main) and type(main[-1]) is ConvBNAct and not main[-1].act:
            out = x
            for m in list(main)[:-1]:
                out = m(out)
            last = main[-1]
            return run_unit(last.conv, last.bn, out, identity, self.act, None, last._backend_choice)
        out = main(x)
        if self.act:
            return run_add_relu(out, identity, self._backend_choice)
        return out + identity


class PreActBlock(FusedModule):
    """The pre-activation residual block (He et al., "Identity Mappings in
    Deep Residual Networks"): a = relu(bn1(x)); out = conv2(relu(bn2(conv1(a))))
    + shortcut, the shortcut being x, or conv1x1(a) when the stride or width
    changes. Children: bn1, conv1, bn2, conv2 [, shortcut]."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 norm_layer: Callable[[int], nn.Module] | None = None, backend: str | None = None) -> None:
        super().__init__()
        norm = norm_layer or nn.BatchNorm2d
        self.bn1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
                         if stride != 1 or in_channels != out_channels else None)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._backend_choice
        if self.shortcut is None:
            # bn1 + ReLU feed only conv1: that unit's prologue.
            h = run_unit(self.conv1, self.bn2, x, None, True, self.bn1, b)
            identity = x
        else:
            a = run_bn_act(self.bn1, x, None, True, b)
            identity = self.shortcut(a)
            h = run_unit(self.conv1, self.bn2, a, None, True, None, b)
        return self.conv2(h) + identity
