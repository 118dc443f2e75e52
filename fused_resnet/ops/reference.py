"""Plain-PyTorch definitions of every fused op: the ground truth.

Tests and benchmarks import these (never copies of them). Each function has
the same signature and semantics as the op of the same name in
torch.ops.fused_resnet (see csrc/fused_resnet.cpp for the schemas), so any
backend can be checked against it, and `backend="reference"` runs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import bn_math

__all__ = [
    "add_relu",
    "bn_relu_prologue",
    "conv2d_prologue_bn_act",
    "max_pool2d",
    "relu_mask",
    "bn_stats",
    "bn_finalize",
    "bn_apply",
    "bn_backward",
    "bn_backward_reduce",
    "bn_backward_elemt",
    "fold_bn",
    "conv2d_bn_act",
    "conv2d_bias_act_shortcut",
    "pack_mask",
    "unpack_mask",
    "memory_format_of",
    "stat_dtype",
]


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The layout the fused ops compute in: channels_last if t is laid out so
    (and not also plainly contiguous), else contiguous. Matches
    fused_resnet::compute_format in csrc/fused_resnet.h."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are fp32, fp64 for fp64 data."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _memory_order(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """t's elements as a flat tensor in the memory order of `fmt`."""
    if fmt == torch.channels_last:
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


def pack_mask(keep: torch.Tensor, fmt: torch.memory_format | None = None) -> torch.Tensor:
    """Bit-pack a boolean tensor in the memory order of `fmt` (default: its
    own): bit i % 8 of byte i // 8 is element i. Returns uint8 of ceil(n/8)."""
    fmt = memory_format_of(keep) if fmt is None else fmt
    flat = _memory_order(keep, fmt).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_mask(mask: torch.Tensor, like: torch.Tensor, fmt: torch.memory_format | None = None) -> torch.Tensor:
    """Inverse of pack_mask: a bool tensor of like's shape."""
    fmt = memory_format_of(like) if fmt is None else fmt
    n = like.numel()
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    bits = ((mask.view(-1, 1) >> shifts) & 1).reshape(-1)[:n].bool()
    if fmt == torch.channels_last:
        N, C, H, W = like.shape
        return bits.view(N, H, W, C).permute(0, 3, 1, 2)
    return bits.view(like.shape)


def _per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.view((1, -1) + (1,) * (ndim - 2))


def add_relu(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """y = relu(x + residual)."""
    return torch.relu(x + residual)


def relu_mask(y: torch.Tensor) -> torch.Tensor:
    """The packed ReLU mask !(y <= 0) of a ReLU output (eager's
    threshold_backward keeps the gradient exactly there), in y's memory order."""
    return pack_mask(~(y <= 0), memory_format_of(y))


def max_pool2d(x: torch.Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool) -> torch.Tensor:
    """F.max_pool2d(x, ...) without indices (the contract of ops.max_pool2d)."""
    return torch.nn.functional.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)


def bn_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over all dims but 1.

    The mean is a plain mean (not var_mean's Welford one), so a channel
    holding +Inf has mean +Inf, as eager BatchNorm's saved mean does."""
    dims = [d for d in range(z.dim()) if d != 1]
    zs = z.to(stat_dtype(z.dtype))
    var, _ = torch.var_mean(zs, dim=dims, correction=0)
    return zs.mean(dim=dims), var


def bn_finalize(
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scale, shift, invstd from batch statistics, plus PyTorch's running
    statistic update in place (nn.BatchNorm2d.forward + F.batch_norm rules)."""
    scale, shift, invstd = bn_math.scale_shift(mean, var, weight, bias, eps)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if running_mean is not None and running_var is not None:
        if momentum is None:  # cumulative moving average
            factor = 1.0 / float(num_batches_tracked.item()) if num_batches_tracked is not None else 0.0
        else:
            factor = momentum
        unbiased = var * (count / (count - 1)) if count > 1 else var
        with torch.no_grad():
            running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
            running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
    return scale, shift, invstd


def bn_apply(
    z: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = [relu](z * scale + shift [+ residual]) and the packed ReLU mask.

    Rounding follows eager: the BN output is rounded to z's dtype before the
    residual add (as nn.BatchNorm2d then `out += identity` does)."""
    fmt = memory_format_of(z)
    acc = stat_dtype(z.dtype)
    out = z.to(acc) * _per_channel(scale.to(acc), z.dim()) + _per_channel(shift.to(acc), z.dim())
    out = out.to(z.dtype)
    if residual is not None:
        out = out + residual.to(out.dtype)
    if relu:
        out = torch.relu(out)
    y = out.to(out_dtype or z.dtype).contiguous(memory_format=fmt)
    mask = pack_mask(y > 0, fmt) if relu else torch.empty(0, dtype=torch.uint8, device=z.device)
    return y, mask


def bn_backward(
    dy: torch.Tensor,
    z: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    batch_stats: bool,
    need_residual_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of bn_apply: dz, dresidual (dy masked, or empty), dweight, dbias."""
    acc = stat_dtype(z.dtype)
    fmt = memory_format_of(z)
    g = _masked_grad(dy, z, mask, acc)
    dims = [d for d in range(z.dim()) if d != 1]
    xhat = _xhat(z, mean, invstd, acc)
    dbias = g.sum(dim=dims)
    dweight = (g * xhat).sum(dim=dims)
    w = torch.ones_like(invstd, dtype=acc) if weight is None else weight.to(acc)
    k = _per_channel(w * invstd.to(acc), z.dim())
    if batch_stats:
        m = z.numel() // z.shape[1]
        dz = k * (g - (_per_channel(dbias, z.dim()) + xhat * _per_channel(dweight, z.dim())) / m)
    else:
        dz = k * g
    dz = dz.to(z.dtype).contiguous(memory_format=fmt)
    if need_residual_grad:
        dres = g.to(dy.dtype).contiguous(memory_format=fmt)
    else:
        dres = torch.empty(0, dtype=dy.dtype, device=dy.device)
    return dz, dres, dweight, dbias


def _masked_grad(dy, z, mask, acc):
    g = dy.to(acc)
    if mask.numel() > 0:
        # A select, as eager's threshold_backward: NaN at a masked position -> 0.
        g = torch.where(unpack_mask(mask, z, memory_format_of(z)), g, torch.zeros((), dtype=g.dtype, device=g.device))
    return g


def _xhat(z, mean, invstd, acc):
    return (z.to(acc) - _per_channel(mean.to(acc), z.dim())) * _per_channel(invstd.to(acc), z.dim())


def bn_backward_reduce(
    dy: torch.Tensor, z: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """bn_backward's reduction alone: (sum dy', sum dy' * xhat) per channel."""
    acc = stat_dtype(z.dtype)
    g = _masked_grad(dy, z, mask, acc)
    dims = [d for d in range(z.dim()) if d != 1]
    xhat = _xhat(z, mean, invstd, acc)
    return g.sum(dim=dims), (g * xhat).sum(dim=dims)


def bn_backward_elemt(
    dy: torch.Tensor,
    z: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    sum_dy: torch.Tensor,
    sum_dy_xhat: torch.Tensor,
    count: int,
    need_residual_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """bn_backward's elementwise pass from given sums over `count` values per
    channel (all processes' batches for synchronised BatchNorm):
    dz = weight * invstd * (dy' - (sum_dy + xhat * sum_dy_xhat) / count)."""
    acc = stat_dtype(z.dtype)
    fmt = memory_format_of(z)
    g = _masked_grad(dy, z, mask, acc)
    xhat = _xhat(z, mean, invstd, acc)
    w = torch.ones_like(invstd, dtype=acc) if weight is None else weight.to(acc)
    k = _per_channel(w * invstd.to(acc), z.dim())
    m = max(count, 1)
    dz = k * (g - (_per_channel(sum_dy.to(acc), z.dim()) + xhat * _per_channel(sum_dy_xhat.to(acc), z.dim())) / m)
    dz = dz.to(z.dtype).contiguous(memory_format=fmt)
    if need_residual_grad:
        dres = g.to(dy.dtype).contiguous(memory_format=fmt)
    else:
        dres = torch.empty(0, dtype=dy.dtype, device=dy.device)
    return dz, dres


def fold_bn(
    weight: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float,
    conv_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold eval-mode BN into the conv before it, in fp32 (fp64 for fp64):
    W' = W * g / sqrt(var + eps), b' = beta + (b - mean) * g / sqrt(var + eps).
    Returns (W', b') in the conv weight's dtype."""
    acc = stat_dtype(weight.dtype)
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if gamma is not None:
        scale = scale * gamma.to(acc)
    b = -running_mean.to(acc)
    if conv_bias is not None:
        b = b + conv_bias.to(acc)
    bias = b * scale
    if beta is not None:
        bias = bias + beta.to(acc)
    w = weight.to(acc) * scale.view(-1, *([1] * (weight.dim() - 1)))
    return w.to(weight.dtype), bias.to(weight.dtype)


def conv2d_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    emit_stats: bool = False,
):
    """The Triton conv's contract: y = [relu](conv(x, w) * scale + shift [+ r]).

    With emit_stats, also the per-channel sum and sum of squares (fp32) of the
    raw conv output z = conv(x, w), the inputs of BatchNorm's batch statistics.
    Returns (y, sum, sumsq) with empty sums when emit_stats is False."""
    z = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    acc = stat_dtype(z.dtype)
    out = z.to(acc)
    if scale is not None:
        out = out * _per_channel(scale.to(acc), 4)
    if shift is not None:
        out = out + _per_channel(shift.to(acc), 4)
    if residual is not None:
        out = out + residual.to(acc)
    if relu:
        out = torch.relu(out)
    y = out.to(x.dtype)
    if emit_stats:
        zf = z.to(acc)
        return y, zf.sum(dim=(0, 2, 3)), (zf * zf).sum(dim=(0, 2, 3))
    empty = torch.empty(0, dtype=acc, device=x.device)
    return y, empty, empty


def bn_relu_prologue(x: torch.Tensor, pre_scale: torch.Tensor, pre_shift: torch.Tensor) -> torch.Tensor:
    """relu(x * pre_scale[c] + pre_shift[c]) in op-math precision, rounded to
    x's dtype: BatchNorm (as scale/shift) + ReLU of the previous layer, what
    the Triton conv's prologue applies to each input tile it loads."""
    acc = stat_dtype(x.dtype)
    v = x.to(acc) * _per_channel(pre_scale.to(acc), x.dim()) + _per_channel(pre_shift.to(acc), x.dim())
    return torch.relu(v).to(x.dtype)


def conv2d_prologue_bn_act(
    x: torch.Tensor,
    pre_scale: torch.Tensor,
    pre_shift: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    emit_stats: bool = False,
):
    """conv2d_bn_act of bn_relu_prologue(x, pre_scale, pre_shift): the conv
    reads the previous layer's raw output x and normalises + rectifies it on
    the fly (zero padding is applied after, as for a materialised input)."""
    return conv2d_bn_act(bn_relu_prologue(x, pre_scale, pre_shift), weight, scale, shift, residual, relu, stride,
                         padding, dilation, groups, emit_stats)


def conv2d_dgrad_prologue(dz, weight, x_prev, pre_scale, pre_shift, padding=0, dilation=1, groups: int = 1):
    """The fused data-gradient contract of conv2d(bn_relu_prologue(x_prev,
    pre_scale, pre_shift), weight, stride 1): with da = the conv's input
    gradient for output gradient dz (op-math precision) and dpre = da where
    the activation is > 0 (ReLU's backward from its output, as eager's),
    returns (dx_prev = dpre * pre_scale in x_prev's dtype, d_pre_scale =
    sum(dpre * x_prev), d_pre_shift = sum(dpre)) with the sums per channel."""
    acc = stat_dtype(x_prev.dtype)
    a = bn_relu_prologue(x_prev, pre_scale, pre_shift)
    da = torch.nn.grad.conv2d_input(tuple(x_prev.shape), weight.to(acc), dz.to(acc), 1, padding, dilation, groups)
    dx, d_pre_scale, d_pre_shift = bn_relu_prologue_backward(da, x_prev, pre_scale, a)
    return dx, d_pre_scale.to(torch.float32), d_pre_shift.to(torch.float32)


def bn_relu_prologue_backward(da, x, pre_scale, a):
    """Backward of a = bn_relu_prologue(x, pre_scale, pre_shift) given da =
    dL/da: (dx in x's dtype, d_pre_scale, d_pre_shift) with the per-channel
    sums in op-math precision. ReLU's backward from its (rounded) output, as
    eager's: a > 0."""
    acc = stat_dtype(x.dtype)
    dpre = torch.where(a > 0, da.to(acc), torch.zeros((), dtype=acc, device=da.device))
    dx = (dpre * _per_channel(pre_scale.to(acc), x.dim())).to(x.dtype)
    dims = [0] + list(range(2, x.dim()))
    return dx, (dpre * x.to(acc)).sum(dim=dims), dpre.sum(dim=dims)


def conv2d_bias_act_shortcut(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    x2: torch.Tensor,
    weight2: torch.Tensor,
    stride2=1,
    relu: bool = True,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """The last conv of a residual block with its projection shortcut, both
    BNs folded (inference): y = [relu](conv(x, w) + conv1x1(x2, w2, stride2)
    + bias). The two convs run in x's dtype; their sum, the bias (usually the
    two folded biases summed in fp32) and the ReLU in fp32 (fp64 for fp64),
    rounded once to x's dtype."""
    z = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    z2 = F.conv2d(x2, weight2, None, stride2)
    acc = stat_dtype(z.dtype)
    out = z.to(acc) + z2.to(acc)
    if bias is not None:
        out = out + _per_channel(bias.to(acc), 4)
    if relu:
        out = torch.relu(out)
    return out.to(x.dtype)
