"""The functional API: one fused op per file, each dispatching to the native
kernels (torch.ops.fused_resnet.*), Triton, or the plain-PyTorch reference.

`reference` holds the ground-truth definitions used by tests and benchmarks;
`cudnn_conv` the cudnn backend's graph ops (functions namespaced there).
"""

from . import reference
from .add_relu import add_relu
from .batch_norm_act import batch_norm_act
from .bn_apply import bn_apply
from .bn_backward import bn_backward
from .bn_backward_elemt import bn_backward_elemt
from .bn_backward_reduce import bn_backward_reduce
from .bn_finalize import bn_finalize
from .bn_stats import bn_stats
from .conv2d_bn_act import conv2d_bias_act_shortcut, conv2d_bn_act
from .conv2d_dgrad_prologue import conv2d_dgrad_prologue
from .conv2d_prologue_bn_act import conv2d_prologue_bn_act
from .max_pool2d import max_pool2d
from .relu_mask import relu_mask
from .sync_batch_norm_act import sync_batch_norm_act
from . import cudnn_conv

__all__ = [
    "reference",
    "add_relu",
    "batch_norm_act",
    "bn_apply",
    "bn_backward",
    "bn_backward_elemt",
    "bn_backward_reduce",
    "bn_finalize",
    "bn_stats",
    "conv2d_bn_act",
    "conv2d_bias_act_shortcut",
    "conv2d_dgrad_prologue",
    "conv2d_prologue_bn_act",
    "max_pool2d",
    "relu_mask",
    "sync_batch_norm_act",
    "cudnn_conv",
]
