"""fused_resnet: ResNet residual blocks with conv + BatchNorm + residual add +
ReLU fused into fewer kernels (Triton and C++/CUDA), as drop-in replacements
for torchvision's ResNet family and for any residual network, giving eager
PyTorch's numbers.

    import fused_resnet
    model = fused_resnet.resnet50()          # instead of torchvision.models.resnet50()
    fused_resnet.convert(torchvision_model)  # or swap the blocks of an existing model
    model = fused_resnet.fuse(any_model)     # any conv-BN-add-ReLU network, through torch.fx
    fused_resnet.set_backend("cpu")          # reference | cpu | cuda | cudnn | triton | auto
    model = fused_resnet.optimize(model, x)  # inference: eval, folds, layout, kernels warmed [, CUDA graph]

Importing never fails because a backend is missing; `fused-resnet info`
(or fused_resnet.availability()) says what can run here and why not.
Layers (docs/design.md): config and _compat at the bottom, dispatch (which
kernel runs), ops (the functional API), backends (the kernels' Python),
nn (the modules), fuse/optimize/export; tools (the CLI, benchmarks, GPU
check) on top, never imported by the rest.
"""

from . import config, dispatch, ops
from .backends import output_cache as _output_cache
from .config import get_fusions, relu_saves, set_autotune, set_cache_dir, set_fusions, set_relu_saves
from .dispatch import BACKENDS, BackendError, availability, available_backends, get_backend, set_backend
from .nn.fuse import FuseReport, fuse, fuse_report
from .nn import (
    MODEL_BUILDERS,
    ConvBNAct,
    FusedBasicBlock,
    FusedBottleneck,
    PreActBlock,
    ResidualBlock,
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
from .optimize import optimize

cpu_cache_stats = _output_cache.cpu_cache_stats
empty_cpu_cache = _output_cache.empty_cpu_cache
reset_cpu_cache_counters = _output_cache.reset_cpu_cache_counters
set_cpu_cache_limit = _output_cache.set_cpu_cache_limit

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendError",
    "availability",
    "available_backends",
    "get_backend",
    "set_backend",
    "config",
    "dispatch",
    "ops",
    "relu_saves",
    "set_relu_saves",
    "set_fusions",
    "get_fusions",
    "set_autotune",
    "set_cache_dir",
    "optimize",
    "fuse",
    "fuse_report",
    "FuseReport",
    "cpu_cache_stats",
    "empty_cpu_cache",
    "reset_cpu_cache_counters",
    "set_cpu_cache_limit",
    "MODEL_BUILDERS",
    "ConvBNAct",
    "ResidualBlock",
    "PreActBlock",
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
