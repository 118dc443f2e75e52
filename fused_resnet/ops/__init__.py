"""The functional API: one fused op per file, each dispatching to the native
kernels (torch.ops.fused_resnet.*), Triton, or the plain-PyTorch reference.

`reference` holds the ground-truth definitions used by tests and benchmarks.
"""

from . import reference
from .add_relu import add_relu
from .conv2d_bn_act import conv2d_bn_act

__all__ = ["reference", "add_relu", "conv2d_bn_act"]
from .batch_norm_act import batch_norm_act
from .bn_apply import bn_apply
from .bn_backward import bn_backward
from .bn_finalize import bn_finalize
from .bn_stats import bn_stats

__all__ += ["batch_norm_act", "bn_apply", "bn_backward", "bn_finalize", "bn_stats"]
from . import cudnn_conv  # the cudnn backend's ops (fake kernels, autograd); functions namespaced there

__all__ += ["cudnn_conv"]
