"""The fused forward paths of the blocks and the stem, per backend.

A block is a chain of "units": conv -> BN [-> + residual] [-> ReLU].

- Eval-mode BN (running statistics): BN is folded into the conv (cached, see
  fold.py) and the unit is one convolution with a bias [+ residual] [+ ReLU]
  epilogue: oneDNN's fused post-ops on CPU (prepacked weights), cuDNN + our
  add_relu kernel on `cuda`, one cuDNN-frontend graph on `cudnn`, the Triton
  conv's epilogue on `triton`.
- Training-mode BN (batch statistics): z = conv(x) through aten, or through a
  conv that also emits the per-channel sums of z and z^2 (the Triton conv's
  epilogue on `triton`; cuDNN's conv + genstats graph on `cudnn`, CUDA tensors,
  bias-free convs, differentiable through cudnn_conv's registered backward),
  then ops.batch_norm_act: statistics, running-stat update, one fused pass for
  BN + residual + ReLU saving a 1-bit mask, and a fused two-pass backward.
  A SyncBatchNorm2d (convert_sync_batchnorm) in training on several
  processes takes ops.sync_batch_norm_act instead: the same fused apply and
  backward, with the statistics and gradient sums all-reduced.

- Projection shortcut in eval on `triton` (switch "shortcut_gemm", on by
  default): a block whose downsample is a foldable 1x1 conv + BN runs its
  last conv and the downsample as one Triton kernel, the downsample being a
  second GEMM accumulated into the last conv's tile, with the two folded
  biases summed in the epilogue (ops.conv2d_bias_act_shortcut): the shortcut
  tensor is never written. Only where no gradient is wanted and the Triton
  kernel runs; otherwise (or with the switch off) the downsample unit runs
  first and the last unit adds its output, as before.

- BN + ReLU in the next conv's prologue in training on `triton` (switch
  "prologue", off by default): inside a block, conv i+1 reads conv i's raw
  output z_i and applies BN_i (scale and shift from z_i's epilogue sums,
  differentiable through them) + ReLU to each tile it loads
  (ops.conv2d_prologue_bn_act); the activation is neither written nor
  saved, the backward recomputes it. The block's last BN (shortcut + ReLU)
  still runs through batch_norm_act. With "prologue_dgrad" (on by default)
  the backward of each stride-1 prologue conv fuses the ReLU + BN backward
  into its data-gradient kernel.

Fusion switches, for ablations: fused_resnet/fusions.py.

Anything we cannot reproduce exactly (another norm layer, a non-zero padding
mode, a block with extra modules) runs the block's reference forward.
Everything here goes through fused_resnet.ops; nothing below knows modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _compat, ops
# Fusion switches live in fused_resnet/fusions.py (the ops read them too);
# re-exported here, where the block paths read them.
from ..fusions import FUSION_DEFAULTS, FUSIONS, FUSIONS_ENV_VAR, get_fusions, set_fusions  # noqa: F401
from ..ops.conv2d_bn_act import shortcut_kernel_runs
from . import finite_bounds
from . import fold as _fold
from .sync_batchnorm import SyncBatchNorm2d


def _is_frozen_bn(bn: nn.Module) -> bool:
    # torchvision.ops.FrozenBatchNorm2d: buffers only, always running stats.
    return type(bn).__name__ == "FrozenBatchNorm2d" and all(
        hasattr(bn, a) for a in ("weight", "bias", "running_mean", "running_var", "eps")
    )


def _is_batchnorm(bn: nn.Module) -> bool:
    # nn.BatchNorm2d itself, a subclass that keeps its forward, or our
    # SyncBatchNorm2d (nn.SyncBatchNorm runs the reference forward).
    return isinstance(bn, nn.BatchNorm2d) and (
        type(bn).forward is nn.BatchNorm2d.forward or type(bn).forward is SyncBatchNorm2d.forward)


def is_plain_conv(conv: nn.Module) -> bool:
    """An nn.Conv2d with zero padding and its stock forward."""
    return isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and type(conv).forward is nn.Conv2d.forward


def bn_supported(bn: nn.Module) -> bool:
    """A BatchNorm whose forward the fused paths reproduce exactly."""
    return _is_batchnorm(bn) or _is_frozen_bn(bn)


def unit_supported(conv: nn.Module, bn: nn.Module) -> bool:
    return is_plain_conv(conv) and bn_supported(bn)


def uses_batch_stats(bn: nn.Module) -> bool:
    """nn.BatchNorm2d.forward's rule: batch statistics in training, and in
    eval too when it tracks no running statistics."""
    if _is_frozen_bn(bn):
        return False
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


# --------------------------------------------------------------------------- eval


def _mkldnn_usable(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module) -> bool:
    """oneDNN's fused conv post-ops (private aten ops, no autograd): CPU,
    fp32, no gradient wanted, not under autocast, torch.compile or
    torch.jit.trace (whose tracer cannot record their Scalar?[] argument)."""
    return (
        not torch.compiler.is_compiling()  # first: dynamo cannot trace the mkldnn query below
        and not torch.jit.is_tracing()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and conv.weight.dtype == torch.float32
        and _compat.mkldnn_fused_conv_available()
        and not _fold.needs_grad(conv, bn)
        and not x.requires_grad
        and not torch.is_autocast_enabled("cpu")
        and x.dim() == 4
        and x.shape[0] > 0
    )


def _mkldnn_unit(conv, bn, x, residual, relu, residual_owned=False):
    def pack():
        w, b = _fold.fold(conv, bn)
        packed = _compat.mkldnn_prepack_weight(w, conv.padding, conv.stride, conv.dilation, conv.groups, x.shape)
        return packed, b, finite_bounds.weight_bounds(w, b)

    w, b, (w_norm, b_max) = _fold.cached(conv, bn, "mkldnn", pack, extra=(tuple(x.shape),))
    # oneDNN's ReLU post-op maps NaN to 0: it is used only where no value can
    # be NaN (finite_bounds.py), else the ReLU runs after the bare conv.
    pre = finite_bounds.pre_activation(x, residual, w_norm, b_max)
    exact_relu = pre < finite_bounds.NO_OVERFLOW
    args = (conv.padding, conv.stride, conv.dilation, conv.groups, "relu" if relu and exact_relu else None)
    if residual is None:
        y = _compat.mkldnn_conv(x, w, b, *args)
    else:
        fmt = _suggest_format(x)
        if residual_owned and _can_accumulate_into(residual, x, fmt):
            # oneDNN's "sum" post-op: the result is written over the residual,
            # which nobody else reads (see block_forward); no output allocation,
            # and one tensor less alive at the block's peak.
            y = _compat.mkldnn_conv_add_(residual, x, w, b, *args)
        else:
            y = _compat.mkldnn_conv_add(x, residual.contiguous(memory_format=fmt), w, b, *args)
    if relu and not exact_relu:
        y = y.relu_()  # y is this unit's own output (or the residual it may overwrite)
    finite_bounds.record(y, pre if exact_relu else math.inf)
    return y


def _can_accumulate_into(residual: torch.Tensor, x: torch.Tensor, fmt: torch.memory_format) -> bool:
    return (
        _compat.mkldnn_inplace_binary_available()
        and not torch.is_grad_enabled()
        and residual.dtype == x.dtype
        and residual.is_contiguous(memory_format=fmt)
        and residual.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        # An inference tensor may only be written inside inference mode.
        and (torch.is_inference_mode_enabled() or not residual.is_inference())
    )


def _suggest_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if ops.reference.memory_format_of(x) == torch.channels_last else torch.contiguous_format


def _epilogue(y: torch.Tensor, residual: torch.Tensor | None, relu: bool, backend: str) -> torch.Tensor:
    if residual is not None:
        if relu:
            return ops.add_relu(y, residual.to(y.dtype), backend=backend)
        return y + residual
    return torch.relu(y) if relu else y


def _eval_unit(conv, bn, x, residual, relu, backend, residual_owned=False):
    if backend == "cpu" and _mkldnn_usable(x, conv, bn):
        return _mkldnn_unit(conv, bn, x, residual, relu, residual_owned)
    w, b = _fold.cached(conv, bn, "fold", lambda: _fold.fold(conv, bn))
    if backend == "cudnn" and x.device.type == "cuda":
        from ..ops import cudnn_conv

        return cudnn_conv.conv_bias_act(
            x, w, b, residual, relu, conv.stride, conv.padding, conv.dilation, conv.groups
        )
    if backend == "triton" and hasattr(ops, "conv2d_bn_act"):
        y, _, _ = ops.conv2d_bn_act(
            x, w, None, b, residual, relu, conv.stride, conv.padding, conv.dilation, conv.groups, False,
            backend=backend,
        )
        return y
    return _epilogue(_conv(conv, x, w, b), residual, relu, backend)


# -------------------------------------------------------------------------- train


def _momentum_for(bn: nn.BatchNorm2d) -> float | None:
    """The momentum the op receives; None = cumulative average, which the op
    computes from num_batches_tracked after incrementing it (on device)."""
    return bn.momentum


def _moments_from_sums(s: torch.Tensor, ss: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 (mean, biased variance) from per-channel sums over `count` values:
    E[x^2] - E[x]^2 clamped at 0 (differentiable in s and ss)."""
    mean = s.double() / count
    return mean, (ss.double() / count - mean * mean).clamp_min(0)


def stats_from_sums(z: torch.Tensor, s: torch.Tensor, ss: torch.Tensor,
                     shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch_mean, batch_var) for ops.batch_norm_act from a conv's per-channel
    sum `s` and sum of squares `ss` of its raw output over N, H, W (z's
    count per channel), when z = raw + shift[c] (a conv bias the sums did
    not see). Biased variance E[raw^2] - E[raw]^2, clamped at 0, formed in
    fp64 from the sums; the sums themselves are fp32, so it cancels
    catastrophically when |mean| >> std (a Welford pass would not).
    Detached: batch_norm_act's backward carries the statistics' gradient."""
    mean, var = _moments_from_sums(s.detach(), ss.detach(), z.numel() // z.shape[1])
    if shift is not None:
        mean = mean + shift.detach().double()
    return mean.to(s.dtype), var.to(s.dtype)


def _cudnn_genstats_operands(conv: nn.Conv2d, x: torch.Tensor):
    """(x, weight) for cudnn_conv.conv_genstats when its graph can run this
    conv (CUDA tensor, the backend built, no conv bias, numeric padding,
    fp16/bf16/fp32 with x's and the weight's dtypes agreeing after autocast's
    cast), else None."""
    from ..ops import cudnn_conv

    if (x.device.type != "cuda" or conv.bias is not None or isinstance(conv.padding, str) or x.shape[0] == 0
            or not cudnn_conv.built()):
        return None
    w = conv.weight
    if torch.is_autocast_enabled("cuda"):
        # What autocast does for F.conv2d: both operands in the autocast dtype
        # (the custom op itself has no autocast rule).
        dt = torch.get_autocast_dtype("cuda")
        if x.dtype != torch.float64 and w.dtype != torch.float64:
            x, w = x.to(dt), w.to(dt)
    if x.dtype != w.dtype or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    return x, w


def _prologue_block_usable(block: nn.Module, x: torch.Tensor, backend: str) -> bool:
    """Whether a block's training forward can run with every inner BN + ReLU
    in the next conv's prologue: switch on, triton backend, every BN a plain
    nn.BatchNorm2d using batch statistics, bias-free convs, no autocast
    (the op has no autocast rule), a non-empty batch."""
    if (not FUSIONS.get("prologue", False) or backend != "triton" or x.dim() != 4 or not x.is_floating_point()
            or x.shape[0] == 0):
        return False
    pairs = _unit_pairs(block)
    if any(type(bn) is not nn.BatchNorm2d or not uses_batch_stats(bn) or conv.bias is not None
           for conv, bn in pairs):
        return False
    return not torch.is_autocast_enabled(x.device.type)


def _unit_pairs(block: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if hasattr(block, "conv3"):
        pairs.append((block.conv3, block.bn3))
    return pairs


def _prologue_params(bn: nn.BatchNorm2d, z: torch.Tensor, s: torch.Tensor, ss: torch.Tensor):
    """(scale, shift) of bn over z, from z's per-channel sum s and sum of
    squares ss, differentiable in bn's weight and bias and through s and ss
    (whose gradients the conv op turns into z's: eager BatchNorm's backward);
    the running statistics are updated with PyTorch's rules (bn_finalize).
    Batch variance E[z^2] - E[z]^2 in fp64 from the fp32 sums, as every
    statistics-from-epilogue path here."""
    _check_batch_values(z)
    count = z.numel() // z.shape[1]
    mean, var = _moments_from_sums(s, ss, count)
    return _prologue_scale_shift(bn, mean, var, count, ops.reference.stat_dtype(z.dtype))


def _prologue_scale_shift(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int, acc: torch.dtype):
    """(scale, shift) of a batch-statistics bn from the batch mean and biased
    variance over `count` values per channel, differentiable in both and in
    bn's weight and bias; the running statistics are updated with PyTorch's
    rules (bn_finalize)."""
    mean, var = mean.double(), var.double()
    if bn.training and bn.running_mean is not None:
        with torch.no_grad():
            ops.bn_finalize(mean.to(acc), var.to(acc), count, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                            bn.num_batches_tracked, _momentum_for(bn), bn.eps)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale.to(acc), shift.to(acc)


def prologue_conv_usable(bn: nn.Module, conv: nn.Module, x: torch.Tensor, backend: str) -> bool:
    """Whether conv(relu(bn(x))) can run as one prologue conv (a chain that
    fuse() found): the "prologue" switch, the triton backend, a plain
    nn.BatchNorm2d using batch statistics, a bias-free conv, no autocast, a
    non-empty 4-D float batch."""
    return (FUSIONS.get("prologue", False) and backend == "triton" and type(bn) is nn.BatchNorm2d
            and uses_batch_stats(bn) and is_plain_conv(conv) and conv.bias is None and x.dim() == 4
            and x.is_floating_point() and x.shape[0] > 0 and not torch.is_autocast_enabled(x.device.type))


def prologue_conv(bn: nn.Module, conv: nn.Module, x: torch.Tensor, backend: str):
    """(z, sum, sumsq): z = conv(relu(bn(x))) with bn in the conv's prologue
    (bn's batch statistics from one bn_stats pass over x, differentiable),
    and the per-channel sums of z for the next BatchNorm."""
    _check_batch_values(x)
    mean, var = ops.bn_stats(x, backend=backend)
    count = x.numel() // x.shape[1]
    pre_scale, pre_shift = _prologue_scale_shift(bn, mean, var, count, ops.reference.stat_dtype(x.dtype))
    return ops.conv2d_prologue_bn_act(x, pre_scale, pre_shift, conv.weight, None, None, None, False, conv.stride,
                                      conv.padding, conv.dilation, conv.groups, True, backend=backend)


def _check_batch_values(z: torch.Tensor) -> None:
    if z.numel() // max(z.shape[1], 1) <= 1:  # F.batch_norm's check and text
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {z.size()}")


def _prologue_block(block: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """A block's training forward with each inner BN + ReLU in the next
    conv's prologue: every conv reads the previous raw output z and writes
    its own z with the statistics from its epilogue; only the last BN (with
    the shortcut and the ReLU) writes an activation, through batch_norm_act."""
    pairs = _unit_pairs(block)
    conv, bn = pairs[0]
    z, s, ss = ops.conv2d_bn_act(x, conv.weight, None, None, None, False, conv.stride, conv.padding, conv.dilation,
                                 conv.groups, True, backend=backend)
    for conv, next_bn in pairs[1:]:
        pre_scale, pre_shift = _prologue_params(bn, z, s, ss)
        z, s, ss = ops.conv2d_prologue_bn_act(z, pre_scale, pre_shift, conv.weight, None, None, None, False,
                                              conv.stride, conv.padding, conv.dilation, conv.groups, True,
                                              backend=backend)
        bn = next_bn
    identity = _shortcut(block, x, backend)
    mean, var = stats_from_sums(z, s, ss)
    return _bn_act(bn, z, identity, True, backend, mean, var)


def _train_unit(conv, bn, x, residual, relu, backend):
    track = bn.training and bn.track_running_stats
    batch_mean = batch_var = None
    genstats = _cudnn_genstats_operands(conv, x) if backend == "cudnn" else None
    if backend == "triton" and hasattr(ops, "conv2d_bn_act") and x.shape[0] > 0:
        z, s, ss = ops.conv2d_bn_act(
            x, conv.weight, None, conv.bias, None, False, conv.stride, conv.padding, conv.dilation, conv.groups,
            True, backend=backend,
        )
        # The epilogue sums the raw conv output, before the shift (conv bias).
        batch_mean, batch_var = stats_from_sums(z, s, ss, conv.bias)
    elif genstats is not None:
        from ..ops import cudnn_conv

        z, s, ss = cudnn_conv.conv_genstats(
            *genstats, None, None, False, conv.stride, conv.padding, conv.dilation, conv.groups)
        batch_mean, batch_var = stats_from_sums(z, s, ss)
    else:
        z = _conv(conv, x, conv.weight, conv.bias)
    return _bn_act(bn, z, residual, relu, backend, batch_mean, batch_var)


def bn_act(bn: nn.Module, z: torch.Tensor, residual: torch.Tensor | None, relu: bool, backend: str,
           batch_mean: torch.Tensor | None = None, batch_var: torch.Tensor | None = None) -> torch.Tensor:
    """relu?(bn(z) [+ residual]) in one pass, with the module's rules: batch
    statistics in training (all-reduced for a synchronised SyncBatchNorm2d),
    running statistics in eval and for FrozenBatchNorm2d."""
    if uses_batch_stats(bn):
        return _bn_act(bn, z, residual, relu, backend, batch_mean, batch_var)
    rm, rv, weight, bias, eps = _fold.bn_eval_tensors(bn)
    return ops.batch_norm_act(z, weight, bias, rm, rv, None, training=False, momentum=None, eps=eps,
                              residual=residual, relu=relu, backend=backend)


def _bn_act(bn, z, residual, relu, backend, batch_mean=None, batch_var=None):
    """relu?(bn(z) [+ residual]) for a BN using batch statistics, fused."""
    track = bn.training and bn.track_running_stats
    if isinstance(bn, SyncBatchNorm2d) and bn.is_synchronised():
        return ops.sync_batch_norm_act(
            z, bn.weight, bn.bias,
            bn.running_mean if track else None, bn.running_var if track else None,
            bn.num_batches_tracked if track else None,
            momentum=_momentum_for(bn), eps=bn.eps, process_group=bn.process_group, residual=residual, relu=relu,
            batch_mean=batch_mean, batch_var=batch_var, backend=backend)
    return ops.batch_norm_act(
        z,
        bn.weight,
        bn.bias,
        bn.running_mean if track else None,
        bn.running_var if track else None,
        bn.num_batches_tracked if track else None,
        training=True,
        momentum=_momentum_for(bn),
        eps=bn.eps,
        residual=residual,
        relu=relu,
        batch_mean=batch_mean,
        batch_var=batch_var,
        backend=backend,
    )


# -------------------------------------------------------------------------- units


def unit(conv: nn.Module, bn: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, relu: bool,
         backend: str, residual_owned: bool = False) -> torch.Tensor:
    """relu?(bn(conv(x)) [+ residual]) with eager's semantics, fused.
    residual_owned: nobody reads `residual` after this call, so an inference
    path may write its result over it."""
    if x.dim() != 4:  # nn.BatchNorm2d's own check and text
        raise ValueError(f"expected 4D input (got {x.dim()}D input)")
    if not x.is_floating_point():
        raise TypeError(f"fused_resnet: the input must be a floating-point tensor, got {x.dtype}")
    if uses_batch_stats(bn):
        return _train_unit(conv, bn, x, residual, relu, backend)
    return _eval_unit(conv, bn, x, residual, relu, backend, residual_owned)


def _downsample_supported(ds: nn.Module | None) -> bool:
    return ds is None or (
        isinstance(ds, nn.Sequential) and len(ds) == 2 and unit_supported(ds[0], ds[1])
    )


def block_supported(block: nn.Module) -> bool:
    pairs = _unit_pairs(block)
    return (
        all(unit_supported(c, b) for c, b in pairs)
        and _downsample_supported(block.downsample)
        and isinstance(block.relu, nn.ReLU)
    )


def _shortcut(block: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    ds = block.downsample
    if ds is None:
        return x
    return unit(ds[0], ds[1], x, None, False, backend)


def _shortcut_gemm_usable(block: nn.Module, conv: nn.Module, bn: nn.Module, out: torch.Tensor, x: torch.Tensor,
                          backend: str) -> bool:
    """Whether the block's last unit (conv, bn) on input `out` can take the
    projection shortcut of block input `x` as a second GEMM: switch on,
    triton backend and its kernel runs for `out`, both BNs in eval (running
    statistics), the downsample a plain 1x1 conv with no padding, dilation or
    groups, no gradient wanted (the fused op has no backward), no autocast,
    one dtype throughout."""
    ds = block.downsample
    if not FUSIONS.get("shortcut_gemm", False) or backend != "triton" or ds is None:
        return False
    dconv, dbn = ds[0], ds[1]
    if uses_batch_stats(bn) or uses_batch_stats(dbn):
        return False
    if (tuple(dconv.kernel_size) != (1, 1) or dconv.padding not in ((0, 0), "valid")
            or tuple(dconv.dilation) != (1, 1) or dconv.groups != 1):
        return False
    if _fold.needs_grad(conv, bn) or _fold.needs_grad(dconv, dbn):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad):
        return False
    if torch.is_autocast_enabled(out.device.type):
        return False
    dt = out.dtype
    if not (x.dtype == dt and conv.weight.dtype == dt and dconv.weight.dtype == dt):
        return False
    return x.dim() == 4 and shortcut_kernel_runs(out, backend)


def _shortcut_gemm_unit(conv: nn.Module, bn: nn.Module, out: torch.Tensor, x: torch.Tensor,
                        ds: nn.Module) -> torch.Tensor:
    """relu(bn(conv(out)) + ds(x)) as one kernel: both BNs folded (cached on
    bn, keyed on the versions of both pairs' tensors), the biases summed in
    fp32."""
    dconv, dbn = ds[0], ds[1]

    def make():
        w, b = _fold.fold_keep_bias(conv, bn)
        w2, b2 = _fold.fold_keep_bias(dconv, dbn)
        return w, w2, b + b2

    if torch.compiler.is_compiling():
        # The tracer folds constants itself (and cannot read data pointers).
        w, w2, bias = make()
    else:
        w, w2, bias = _fold.cached(conv, bn, "shortcut-gemm", make, extra=_fold.pair_key(dconv, dbn))
    return ops.conv2d_bias_act_shortcut(out, w, bias, x, w2, dconv.stride, True, conv.stride, conv.padding,
                                        conv.dilation, conv.groups, backend="triton")


def block_forward(block: nn.Module, x: torch.Tensor, backend: str, input_owned: bool = False) -> torch.Tensor:
    """Forward of a FusedBasicBlock / FusedBottleneck on `backend`.
    input_owned: nobody reads `x` after this block (see
    may_overwrite_block_inputs), so an identity shortcut may be overwritten
    with the block's output; a downsample's output always may."""
    if not block_supported(block):
        return block.reference_forward(x)
    if _prologue_block_usable(block, x, backend):
        return _prologue_block(block, x, backend)
    finite_bounds.new_scope()
    out = unit(block.conv1, block.bn1, x, None, True, backend)
    if hasattr(block, "conv3"):
        out = unit(block.conv2, block.bn2, out, None, True, backend)
        last_conv, last_bn = block.conv3, block.bn3
    else:
        last_conv, last_bn = block.conv2, block.bn2
    if _shortcut_gemm_usable(block, last_conv, last_bn, out, x, backend):
        return _shortcut_gemm_unit(last_conv, last_bn, out, x, block.downsample)
    identity = _shortcut(block, x, backend)
    owned = input_owned or block.downsample is not None
    return unit(last_conv, last_bn, out, identity, True, backend, residual_owned=owned)


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def may_overwrite_block_inputs(model: nn.Module, layers: list[nn.Module], x: torch.Tensor,
                               model_input: torch.Tensor) -> bool:
    """Whether a ResNet's forward may run the blocks of `layers` itself with
    every block input owned (overwritten by the block's output where the
    block ends in an identity shortcut): no gradient, a CPU fp32 input (the
    only path that writes in place is oneDNN's), not tracing, only supported
    fused blocks in plain nn.Sequential layers, no forward hooks anywhere on
    the chain or the stem (a hook could hold a block's output, i.e. the next
    block's input), and the first block's input `x` not the caller's
    `model_input` (a stem of Identity modules)."""
    from . import blocks

    if (torch.is_grad_enabled() or torch.compiler.is_compiling() or x.device.type != "cpu"
            or x.dtype != torch.float32):
        return False
    if _compat.global_forward_hooks_registered():
        return False
    if x.untyped_storage().data_ptr() == model_input.untyped_storage().data_ptr():
        return False
    if any(_has_hooks(m) for m in (model.conv1, model.bn1, model.relu, model.maxpool)):
        return False
    for layer in layers:
        if type(layer) is not nn.Sequential or _has_hooks(layer):
            return False
        for block in layer:
            if not isinstance(block, (blocks.FusedBasicBlock, blocks.FusedBottleneck)) or _has_hooks(block):
                return False
    return True


def pool_forward(model: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """model.maxpool(x); on CPU with no gradient wanted, through ops.max_pool2d,
    which skips the int64 indices aten computes next to the output."""
    mp = model.maxpool
    if (backend == "reference" or type(mp) is not nn.MaxPool2d or mp.return_indices or _has_hooks(mp)
            or _compat.global_forward_hooks_registered()
            or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad)):
        return mp(x)
    y = ops.max_pool2d(x, mp.kernel_size, mp.stride, mp.padding, mp.dilation, mp.ceil_mode, backend=backend)
    finite_bounds.carry(x, y)  # a max pool's values are some of its input's
    return y


def stem_forward(model: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """conv1 -> bn1 -> relu of a ResNet on `backend`."""
    if not (unit_supported(model.conv1, model.bn1) and isinstance(model.relu, nn.ReLU)):
        return model.relu(model.bn1(model.conv1(x)))
    finite_bounds.new_scope()
    return unit(model.conv1, model.bn1, x, None, True, backend)
