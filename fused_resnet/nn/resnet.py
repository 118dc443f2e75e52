"""The ResNet family with torchvision's builders, constructor arguments, module
names and state_dict keys, built from the fused blocks.

Modules are created and initialised in torchvision's order, so under the same
seed `fused_resnet.resnet50()` and `torchvision.models.resnet50()` start from
identical weights.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .. import dispatch
from . import fx_tracing, paths
from .blocks import FusedBasicBlock, FusedBottleneck, conv1x1

__all__ = [
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "MODEL_BUILDERS",
]


class ResNet(nn.Module):
    """torchvision.models.ResNet with fused residual blocks and a fused stem.

    Args are torchvision's, plus `backend` (None = the global choice; see
    fused_resnet.set_backend). Under torch.jit.script the model compiles to
    torchvision's forward (eager ops; see FusedBasicBlock)."""

    __jit_unused_properties__ = ["backend"]
    __jit_ignored_attributes__ = ["_backend_choice", "_norm_layer"]

    def __init__(
        self,
        block: type[FusedBasicBlock | FusedBottleneck],
        layers: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: list[bool] | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation should be None "
                f"or a 3-element tuple, got {replace_stride_with_dilation}"
            )
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        # Zero-initialize the last BN in each residual branch, so that the
        # residual branch starts with zeros and each block behaves like an
        # identity (https://arxiv.org/abs/1706.02677), as torchvision does.
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, FusedBottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, FusedBasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)
        self.set_backend(backend)

    def _make_layer(
        self,
        block: type[FusedBasicBlock | FusedBottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
        dilate: bool = False,
    ) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        layers = [
            block(
                self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation, norm_layer
            )
        ]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(
                    self.inplanes,
                    planes,
                    groups=self.groups,
                    base_width=self.base_width,
                    dilation=self.dilation,
                    norm_layer=norm_layer,
                )
            )
        return nn.Sequential(*layers)

    def set_backend(self, name: str | None) -> "ResNet":
        """Choose the backend of every fused part of this model (None: follow
        the global choice). Returns self."""
        self._backend_choice = None if name is None else dispatch.validate(name)
        for m in self.modules():
            if isinstance(m, (FusedBasicBlock, FusedBottleneck)):
                m.backend = self._backend_choice
        return self

    @property
    def backend(self) -> str | None:
        return self._backend_choice

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._eager_forward_impl(x)
        return self._fused_forward_impl(x)

    def _eager_forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's ResNet._forward_impl, op for op (what TorchScript compiles)."""
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x

    @torch.jit.unused
    def _fused_forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        return fused_forward(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_impl(x)


def fused_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The fused forward of a ResNet (ours, or torchvision's after convert()):
    stem, pool, layers, head, with torchvision's structure under torch.fx."""
    if fx_tracing.symbolic_tracing():
        # torchvision's structure, module by module (nn/fx_tracing.py); the
        # stem as its eager modules, so its nodes keep their names.
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    else:
        # The pooled stem output goes to _layers in a list it empties, so
        # that no frame of ours keeps it alive once layer1 has consumed it.
        x = _layers(model, [_stem_and_pool(model, x)], x)
    x = model.avgpool(x)
    x = torch.flatten(x, 1)
    return model.fc(x)


def _stem_and_pool(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    choice = model._backend_choice
    if dispatch.runs_eager(choice, x.device):
        return model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return paths.stem.pool_forward(model, paths.stem.stem_forward(model, x, choice), choice)


def _layers(model: nn.Module, held: list[torch.Tensor], model_input: torch.Tensor) -> torch.Tensor:
    """layer1..layer4 on held.pop() (the pooled stem output)."""
    x = held.pop()
    layers = [model.layer1, model.layer2, model.layer3, model.layer4]
    if not paths.ownership.may_overwrite_block_inputs(model, layers, x, model_input,
                                                      (FusedBasicBlock, FusedBottleneck)):
        for layer in layers:
            x = layer(x)
        return x
    # Inference without hooks: every block input is a temporary of this loop,
    # so an identity block may write its output over its input (what
    # torch.compile's memory planning does): fewer allocations and a lower
    # peak, which on CPU also keeps the allocator from handing pages back to
    # the OS and faulting them in again on the next call.
    for layer in layers:
        for block in layer:
            x = block._forward_input_owned(x)
    return x


def _resnet(
    block: type[FusedBasicBlock | FusedBottleneck],
    layers: list[int],
    weights: Any,
    progress: bool,
    **kwargs: Any,
) -> ResNet:
    if weights is not None:
        # torchvision's weight enums (e.g. ResNet50_Weights.DEFAULT) give
        # torchvision-format state_dicts, which are ours too.
        kwargs.setdefault("num_classes", len(weights.meta["categories"]))
    model = ResNet(block, layers, **kwargs)
    if weights is not None:
        model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
    return model


def _set_default(kwargs: dict, key: str, value: Any) -> None:
    if key in kwargs and kwargs[key] != value:
        raise ValueError(f"The parameter '{key}' expected value {value} but got {kwargs[key]} instead.")
    kwargs[key] = value


def resnet18(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-18 (torchvision.models.resnet18's signature)."""
    return _resnet(FusedBasicBlock, [2, 2, 2, 2], weights, progress, **kwargs)


def resnet34(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-34 (torchvision.models.resnet34's signature)."""
    return _resnet(FusedBasicBlock, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet50(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-50 (torchvision.models.resnet50's signature)."""
    return _resnet(FusedBottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet101(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-101 (torchvision.models.resnet101's signature)."""
    return _resnet(FusedBottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def resnet152(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-152 (torchvision.models.resnet152's signature)."""
    return _resnet(FusedBottleneck, [3, 8, 36, 3], weights, progress, **kwargs)


def resnext50_32x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d (torchvision.models.resnext50_32x4d's signature)."""
    _set_default(kwargs, "groups", 32)
    _set_default(kwargs, "width_per_group", 4)
    return _resnet(FusedBottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def resnext101_32x8d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d (torchvision.models.resnext101_32x8d's signature)."""
    _set_default(kwargs, "groups", 32)
    _set_default(kwargs, "width_per_group", 8)
    return _resnet(FusedBottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def resnext101_64x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-101 64x4d (torchvision.models.resnext101_64x4d's signature)."""
    _set_default(kwargs, "groups", 64)
    _set_default(kwargs, "width_per_group", 4)
    return _resnet(FusedBottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def wide_resnet50_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """Wide ResNet-50-2 (torchvision.models.wide_resnet50_2's signature)."""
    _set_default(kwargs, "width_per_group", 64 * 2)
    return _resnet(FusedBottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def wide_resnet101_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """Wide ResNet-101-2 (torchvision.models.wide_resnet101_2's signature)."""
    _set_default(kwargs, "width_per_group", 64 * 2)
    return _resnet(FusedBottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


MODEL_BUILDERS: dict[str, Callable[..., ResNet]] = {
    f.__name__: f
    for f in (
        resnet18,
        resnet34,
        resnet50,
        resnet101,
        resnet152,
        resnext50_32x4d,
        resnext101_32x8d,
        resnext101_64x4d,
        wide_resnet50_2,
        wide_resnet101_2,
    )
}
