"""The triton backend's units (dispatch.UNITS): every conv a Triton implicit
GEMM with its epilogue fused (folded BN bias, residual, ReLU in inference;
the BatchNorm statistics of the raw output in training), the projection
shortcut as a second GEMM of a block's last conv (switch "shortcut_gemm"),
and, with the "prologue" switch, each inner BN + ReLU of a training block
applied by the next conv as it loads its input. Where the Triton kernel
cannot run (conv_ops.kernel_runs), the conv ops compute the same contract
with aten."""

from __future__ import annotations

import torch

from ... import _compat, config, ops
from .. import bn_modules, fold, units
from .conv_ops import kernel_runs


def eval_unit(conv, bn, x: torch.Tensor, residual, relu: bool, residual_owned: bool, backend: str):
    w, b = fold.cached(conv, bn, "fold", lambda: fold.fold(conv, bn))
    y, _, _ = ops.conv2d_bn_act(x, w, None, b, residual, relu, conv.stride, conv.padding, conv.dilation,
                                conv.groups, False, backend=backend)
    return y


def train_conv(conv, x: torch.Tensor, backend: str):
    if x.shape[0] == 0:
        return units.train_conv(conv, x, backend)
    z, s, ss = ops.conv2d_bn_act(x, conv.weight, None, conv.bias, None, False, conv.stride, conv.padding,
                                 conv.dilation, conv.groups, True, backend=backend)
    # The epilogue sums the raw conv output, before the shift (conv bias).
    return (z, *bn_modules.stats_from_sums(z, s, ss, conv.bias))


# ------------------------------------------------------- projection shortcut


def _shortcut_usable(conv, bn, dconv, dbn, out: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a block's last unit (conv, bn) on input `out` can take the
    projection shortcut (dconv, dbn) of block input `x` as a second GEMM:
    the switch on, the kernel runs for `out`, both BNs with running
    statistics, the downsample a plain 1x1 conv with no padding, dilation
    or groups, no gradient wanted (the fused op has no backward), no
    autocast, one dtype throughout."""
    if not config.fusion("shortcut_gemm"):
        return False
    if bn_modules.uses_batch_stats(bn) or bn_modules.uses_batch_stats(dbn):
        return False
    if (tuple(dconv.kernel_size) != (1, 1) or dconv.padding not in ((0, 0), "valid")
            or tuple(dconv.dilation) != (1, 1) or dconv.groups != 1):
        return False
    if fold.needs_grad(conv, bn) or fold.needs_grad(dconv, dbn):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad):
        return False
    if torch.is_autocast_enabled(out.device.type):
        return False
    dt = out.dtype
    if not (x.dtype == dt and conv.weight.dtype == dt and dconv.weight.dtype == dt):
        return False
    return x.dim() == 4 and _kernel_runs_on(out.device.type, str(dt).removeprefix("torch."))


# Depends only on the device type, the dtype and the environment: torch.compile
# may fold it to a constant (its tracer cannot enter availability()'s cache).
@_compat.assume_constant_result
def _kernel_runs_on(device_type: str, dtype_name: str) -> bool:
    return kernel_runs(device_type, getattr(torch, dtype_name))


def shortcut_unit(block, conv, bn, out: torch.Tensor, x: torch.Tensor, backend: str):
    """relu(bn(conv(out)) + downsample(x)) as one kernel: both BNs folded
    (cached on bn, keyed on the versions of both pairs' tensors), the biases
    summed in fp32; None where the fused kernel cannot take it."""
    ds = block.downsample
    if ds is None:
        return None
    dconv, dbn = ds[0], ds[1]
    if not _shortcut_usable(conv, bn, dconv, dbn, out, x):
        return None

    def make():
        w, b = fold.fold_keep_bias(conv, bn)
        w2, b2 = fold.fold_keep_bias(dconv, dbn)
        return w, w2, b + b2

    if torch.compiler.is_compiling():
        # The tracer folds constants itself (and cannot read data pointers).
        w, w2, bias = make()
    else:
        w, w2, bias = fold.cached(conv, bn, "shortcut-gemm", make, extra=fold.pair_key(dconv, dbn))
    return ops.conv2d_bias_act_shortcut(out, w, bias, x, w2, dconv.stride, True, conv.stride, conv.padding,
                                        conv.dilation, conv.groups, backend=backend)


# ------------------------------------------------------- BN + ReLU prologue


def prologue_conv_usable(bn, conv, x: torch.Tensor) -> bool:
    """Whether conv(relu(bn(x))) can run as one prologue conv: the "prologue"
    switch, a plain nn.BatchNorm2d using batch statistics, a bias-free conv,
    no autocast (the op has no autocast rule), a non-empty 4-D float batch."""
    return (config.fusion("prologue") and type(bn) is torch.nn.BatchNorm2d and bn_modules.uses_batch_stats(bn)
            and bn_modules.is_plain_conv(conv) and conv.bias is None and x.dim() == 4 and x.is_floating_point()
            and x.shape[0] > 0 and not torch.is_autocast_enabled(x.device.type))


def _prologue_params(bn, z: torch.Tensor, s: torch.Tensor, ss: torch.Tensor):
    """(scale, shift) of bn over z from z's per-channel sums (the previous
    conv's epilogue), differentiable through them (the conv op turns their
    gradients into z's: eager BatchNorm's backward); running statistics
    updated. Batch variance E[z^2] - E[z]^2 in fp64 from the fp32 sums."""
    bn_modules.check_batch_values(z)
    count = z.numel() // z.shape[1]
    mean, var = ops.bn_math.moments_from_sums(s.double(), ss.double(), count)
    return bn_modules.batch_scale_shift(bn, mean, var, count, ops.reference.stat_dtype(z.dtype))


def prologue_block(block, x: torch.Tensor, shortcut, backend: str):
    """A block's training forward with each inner BN + ReLU in the next
    conv's prologue: every conv reads the previous raw output z and writes
    its own z with the statistics from its epilogue; only the last BN (with
    the shortcut and the ReLU) writes an activation. `shortcut()` computes
    the block's identity. None where the block cannot run so."""
    pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if hasattr(block, "conv3"):
        pairs.append((block.conv3, block.bn3))
    if not all(prologue_conv_usable(bn, conv, x) for conv, bn in pairs):
        return None
    conv, bn = pairs[0]
    z, s, ss = ops.conv2d_bn_act(x, conv.weight, None, None, None, False, conv.stride, conv.padding, conv.dilation,
                                 conv.groups, True, backend=backend)
    for conv, next_bn in pairs[1:]:
        pre_scale, pre_shift = _prologue_params(bn, z, s, ss)
        z, s, ss = ops.conv2d_prologue_bn_act(z, pre_scale, pre_shift, conv.weight, None, None, None, False,
                                              conv.stride, conv.padding, conv.dilation, conv.groups, True,
                                              backend=backend)
        bn = next_bn
    identity = shortcut()
    mean, var = bn_modules.stats_from_sums(z, s, ss)
    return bn_modules.bn_act(bn, z, identity, True, backend, mean, var)


def prologue_conv(bn, conv, x: torch.Tensor, backend: str):
    """(z, sum, sumsq) of z = conv(relu(bn(x))) with bn in the conv's prologue
    (bn's batch statistics from one bn_stats pass over x, differentiable;
    the chains fuse() builds), or None where it cannot run so."""
    if not prologue_conv_usable(bn, conv, x):
        return None
    bn_modules.check_batch_values(x)
    mean, var = ops.bn_stats(x, backend=backend)
    count = x.numel() // x.shape[1]
    pre_scale, pre_shift = bn_modules.batch_scale_shift(bn, mean, var, count, ops.reference.stat_dtype(x.dtype))
    return ops.conv2d_prologue_bn_act(x, pre_scale, pre_shift, conv.weight, None, None, None, False, conv.stride,
                                      conv.padding, conv.dilation, conv.groups, True, backend=backend)
