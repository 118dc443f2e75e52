"""fused_resnet: ResNet residual blocks with conv + BatchNorm + residual add +
ReLU fused into fewer kernels (Triton and C++/CUDA), as drop-in replacements
for torchvision's ResNet family, giving eager PyTorch's numbers.

    import fused_resnet
    model = fused_resnet.resnet50()          # instead of torchvision.models.resnet50()
    fused_resnet.convert(torchvision_model)  # or swap the blocks of an existing model
    fused_resnet.set_backend("cpu")          # reference | cpu | cuda | cudnn | triton | auto
    model = fused_resnet.optimize(model, x)  # inference: eval, folds, layout, kernels warmed [, CUDA graph]

Importing never fails because a backend is missing; `fused-resnet info`
(or fused_resnet.availability()) says what can run here and why not.
"""

from ._backend import BACKENDS, BackendError, availability, available_backends, get_backend, set_backend
from . import ops
from .ops.batch_norm_act import relu_saves, set_relu_saves
from .fusions import get_fusions, set_fusions
from .optimize import optimize
from .fuse import FuseReport, fuse, fuse_report
from .cpu_cache import cpu_cache_stats, empty_cpu_cache, reset_cpu_cache_counters, set_cpu_cache_limit
from .nn import (
    MODEL_BUILDERS,
    FusedBasicBlock,
    FusedBottleneck,
    ResNet,
    SyncBatchNorm2d,
    convert,
    convert_sync_batchnorm,
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

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendError",
    "availability",
    "available_backends",
    "get_backend",
    "set_backend",
    "ops",
    "relu_saves",
    "set_relu_saves",
    "set_fusions",
    "get_fusions",
    "optimize",
    "fuse",
    "fuse_report",
    "FuseReport",
    "cpu_cache_stats",
    "empty_cpu_cache",
    "reset_cpu_cache_counters",
    "set_cpu_cache_limit",
    "MODEL_BUILDERS",
    "FusedBasicBlock",
    "FusedBottleneck",
    "ResNet",
    "convert",
    "convert_sync_batchnorm",
    "SyncBatchNorm2d",
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
