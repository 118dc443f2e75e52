"""Drop-in fused ResNet modules: the blocks, the torchvision-compatible
builders and convert()."""

from .blocks import FusedBasicBlock, FusedBottleneck, conv1x1, conv3x3
from .composable import ConvBNAct, PreActBlock, ResidualBlock
from .convert import convert
from .sync_batchnorm import SyncBatchNorm2d, convert_sync_batchnorm
from .resnet import (
    MODEL_BUILDERS,
    ResNet,
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

__all__ = [
    "ConvBNAct",
    "PreActBlock",
    "ResidualBlock",
    "FusedBasicBlock",
    "FusedBottleneck",
    "conv1x1",
    "conv3x3",
    "convert",
    "convert_sync_batchnorm",
    "SyncBatchNorm2d",
    "MODEL_BUILDERS",
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
]
