"""The cudnn backend's ops: convolution + epilogue fused in cuDNN graphs
(csrc/cudnn/, built when the cuDNN frontend's headers are found).

- conv_bias_act: y = [relu](conv(x, w) [+ bias] [+ residual]), one graph
  (inference, BN folded into w and bias; differentiable);
- conv_genstats: z = conv([relu](x * in_scale + in_shift), w) with the
  per-channel sum and sum of squares of z from the same graph (training
  forward; the optional prologue applies the previous layer's BN + ReLU as the
  conv reads its input). Differentiable in x, w, in_scale and in_shift, through
  z and the sums (_genstats_backward: dgrad/wgrad graphs, the prologue
  recomputed, not saved); the `cudnn` blocks train through it;
- conv_bn_train: conv_genstats -> bn_finalize (PyTorch's running-statistic
  rules) -> bn_apply, the whole training forward of conv + BN [+ add] [+ ReLU]
  (forward only: the blocks use conv_genstats + ops.batch_norm_act instead);
- conv_dgrad / conv_wgrad: the convolution's gradients as cuDNN graphs.

Each graph is built and its plan chosen once per (operands' shapes, strides,
dtypes, alignment, device, conv parameters, math flags). A graph cuDNN refuses
runs as aten's convolution + an fp32 epilogue instead and is listed by
fallbacks(). The ops run on CUDA tensors; elsewhere the functions compute the
same contract with the reference ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import dispatch
from ...ops import bn_math, conv_args, reference

__all__ = [
    "built",
    "conv_bias_act",
    "conv_genstats",
    "conv_bn_train",
    "conv_dgrad",
    "conv_wgrad",
    "graph_key",
    "cache_stats",
    "fallbacks",
    "clear_cache",
]


def built() -> bool:
    """True when fused_resnet._C holds the cuDNN graphs (the frontend headers
    were found at build time); whether a GPU is visible is a separate matter
    (fused_resnet.availability()["cudnn"])."""
    return dispatch.cudnn_graphs_built()


def _pair(v, what: str) -> list[int]:
    return conv_args.pair(v, what, "fused_resnet.cudnn")


def _out_shape(x_shape, w_shape, stride, padding, dilation):
    return (x_shape[0], w_shape[0], *conv_args.out_hw(x_shape, w_shape, stride, padding, dilation))


def _runs_native(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and built()


def _channel(v: torch.Tensor | None, acc: torch.dtype = torch.float32) -> torch.Tensor | None:
    return None if v is None else v.to(acc).view(1, -1, 1, 1)


def _schemas_defined() -> bool:
    # An extension built before these schemas existed must not break import.
    if not dispatch.native_loaded():
        return False
    try:
        torch.ops.fused_resnet.cudnn_conv_bias_act.default
    except (AttributeError, RuntimeError):
        return False
    return True


if _schemas_defined():
    # Fake kernels: the schemas exist whenever _C loads, the CUDA kernels only
    # when the backend was built; tracing needs the shapes either way.

    @torch.library.register_fake("fused_resnet::cudnn_conv_bias_act")
    def _bias_act_fake(x, weight, bias, residual, relu, stride, padding, dilation, groups):
        shape = _out_shape(x.shape, weight.shape, stride, padding, dilation)
        return x.new_empty(shape).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("fused_resnet::cudnn_conv_genstats")
    def _genstats_fake(x, weight, in_scale, in_shift, in_relu, stride, padding, dilation, groups):
        shape = _out_shape(x.shape, weight.shape, stride, padding, dilation)
        z = x.new_empty(shape).contiguous(memory_format=torch.channels_last)
        return z, x.new_empty((shape[1],), dtype=torch.float32), x.new_empty((shape[1],), dtype=torch.float32)

    @torch.library.register_fake("fused_resnet::cudnn_conv_dgrad")
    def _dgrad_fake(dy, weight, x_size, stride, padding, dilation, groups):
        return dy.new_empty(list(x_size)).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("fused_resnet::cudnn_conv_wgrad")
    def _wgrad_fake(dy, x, weight_size, stride, padding, dilation, groups):
        return x.new_empty(list(weight_size)).contiguous(memory_format=torch.channels_last)

    def _bias_act_setup(ctx, inputs, output):
        x, weight, bias, residual, relu, stride, padding, dilation, groups = inputs
        ctx.conv = (list(stride), list(padding), list(dilation), groups)
        ctx.relu = relu
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.has_residual = residual is not None
        ctx.save_for_backward(x, weight, output if relu else None)

    def _bias_act_backward(ctx, gy):
        x, weight, y = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        needs = ctx.needs_input_grad
        g = torch.where(y > 0, gy, torch.zeros((), dtype=gy.dtype, device=gy.device)) if ctx.relu else gy
        g = g.contiguous(memory_format=torch.channels_last)
        dx = conv_dgrad(g, weight, x.shape, stride, padding, dilation, groups) if needs[0] else None
        dw = conv_wgrad(g, x, weight.shape, stride, padding, dilation, groups) if needs[1] else None
        if dw is not None:
            dw = dw.contiguous(memory_format=reference.memory_format_of(weight))
        db = g.float().sum(dim=(0, 2, 3)).to(ctx.bias_dtype) if ctx.bias_dtype is not None and needs[2] else None
        dr = g if ctx.has_residual and needs[3] else None
        return dx, dw, db, dr, None, None, None, None, None

    torch.library.register_autograd(
        "fused_resnet::cudnn_conv_bias_act", _bias_act_backward, setup_context=_bias_act_setup
    )

    def _genstats_setup(ctx, inputs, output):
        x, weight, in_scale, in_shift, in_relu, stride, padding, dilation, groups = inputs
        ctx.conv = (list(stride), list(padding), list(dilation), groups)
        ctx.in_relu = in_relu
        # Outputs nobody used arrive as None rather than zeros, so the usual
        # case (only z feeds the loss; the sums feed BN's no-grad finalize)
        # costs no extra pass.
        ctx.set_materialize_grads(False)
        # z is saved for the sum-of-squares term (BN saves it anyway); the
        # prologue's output is recomputed in backward, never kept.
        ctx.save_for_backward(x, weight, in_scale, in_shift, output[0])

    def _genstats_autograd(ctx, dz, dsum, dsumsq):
        x, weight, in_scale, in_shift, z = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        dx, dw, dsc, dsh = _genstats_backward(
            x, weight, in_scale, in_shift, ctx.in_relu, stride, padding, dilation, groups, z, dz, dsum, dsumsq,
            ctx.needs_input_grad[:4])
        return dx, dw, dsc, dsh, None, None, None, None, None

    torch.library.register_autograd(
        "fused_resnet::cudnn_conv_genstats", _genstats_autograd, setup_context=_genstats_setup
    )


def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """y = [relu](conv2d(x, weight) [+ bias[c]] [+ residual]) in one cuDNN graph.

    Args:
        x: (N, C, H, W) fp16, bf16 or fp32 (channels_last is the layout the
            fusion engines run; NCHW input is copied to it first).
        weight: (K, C/groups, R, S) of x's dtype (BN folded in, see
            reference.fold_bn).
        bias: (K,) fp32 or x's dtype, or None.
        residual: tensor of the output's shape and x's dtype, or None.
        relu: apply ReLU last.
        stride, padding, dilation: int or pair; groups: int.

    Returns y in channels_last, x's dtype. Differentiable (the backward runs
    cuDNN dgrad/wgrad graphs). Non-CUDA tensors, or a build without the cuDNN
    frontend, compute the same with F.conv2d + the epilogue in fp32.
    """
    s, p, d = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if _runs_native(x):
        return torch.ops.fused_resnet.cudnn_conv_bias_act(x, weight, bias, residual, relu, s, p, d, groups)
    # The epilogue in fp32 (fp64 for fp64 input), as the graph computes it.
    acc_t = reference.stat_dtype(x.dtype)
    acc = F.conv2d(x, weight, None, s, p, d, groups).to(acc_t)
    if bias is not None:
        acc = acc + _channel(bias, acc_t)
    if residual is not None:
        acc = acc + residual.to(acc_t)
    if relu:
        acc = torch.relu(acc)
    return acc.to(x.dtype).contiguous(memory_format=torch.channels_last)


def conv_genstats(
    x: torch.Tensor,
    weight: torch.Tensor,
    in_scale: torch.Tensor | None = None,
    in_shift: torch.Tensor | None = None,
    in_relu: bool = False,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z = conv2d(prologue(x), weight) and the fp32 per-channel sum and sum of
    squares of z, in one cuDNN graph. prologue(x) = [relu](x * in_scale[c] +
    in_shift[c]) when in_scale/in_shift are given (the previous layer's BN),
    else x. Returns (z in channels_last, sum, sumsq); the sums are fp32 (fp64
    for fp64 input on the non-CUDA path). Differentiable in x, weight,
    in_scale and in_shift through all three outputs (_genstats_backward);
    the non-CUDA path through plain autograd."""
    s, p, d = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if _runs_native(x):
        return torch.ops.fused_resnet.cudnn_conv_genstats(x, weight, in_scale, in_shift, in_relu, s, p, d, groups)
    acc_t = reference.stat_dtype(x.dtype)
    inp = x
    if in_scale is not None:
        inp = x.to(acc_t) * _channel(in_scale, acc_t) + _channel(in_shift, acc_t)
        inp = (torch.relu(inp) if in_relu else inp).to(x.dtype)
    z = F.conv2d(inp, weight, None, s, p, d, groups).contiguous(memory_format=torch.channels_last)
    zf = z.to(acc_t)
    return z, zf.sum(dim=(0, 2, 3)), (zf * zf).sum(dim=(0, 2, 3))


def _genstats_backward(
    x: torch.Tensor,
    weight: torch.Tensor,
    in_scale: torch.Tensor | None,
    in_shift: torch.Tensor | None,
    in_relu: bool,
    stride,
    padding,
    dilation,
    groups: int,
    z: torch.Tensor,
    dz: torch.Tensor | None,
    dsum: torch.Tensor | None,
    dsumsq: torch.Tensor | None,
    needs_input_grad=(True, True, True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The backward of conv_genstats: (dx, dweight, din_scale, din_shift)
    given the gradients of its outputs (z, sum, sumsq), any of them None.

    The total gradient of z is g = dz + dsum[c] + 2 * z * dsumsq[c] (in fp32,
    fp64 for fp64, rounded to z's dtype for the convolution's gradients);
    d(conv input) = conv_dgrad(g), dweight = conv_wgrad(g, prologue(x)) with
    prologue(x) recomputed as the forward computes it. Through the prologue
    (a = x * in_scale + in_shift, mask = a > 0 under in_relu, else all true):
    dx = dinp * in_scale * mask, din_scale = sum over N, H, W of
    dinp * x * mask, din_shift = sum of dinp * mask. Runs wherever
    conv_dgrad/conv_wgrad run (cuDNN graphs on CUDA, aten elsewhere).
    needs_input_grad: which of (x, weight, in_scale, in_shift) to compute."""
    need_x, need_w, need_sc, need_sh = (bool(n) for n in needs_input_grad)
    prologue = in_scale is not None
    if not prologue:
        need_sc = need_sh = False
    if dz is None and dsum is None and dsumsq is None:
        return None, None, None, None
    acc = reference.stat_dtype(z.dtype)
    if dsum is None and dsumsq is None:
        g = dz
    else:
        g = dz.to(acc) if dz is not None else torch.zeros(z.shape, dtype=acc, device=z.device)
        if dsum is not None:
            g = g + _channel(dsum, acc)
        if dsumsq is not None:
            g = g + 2 * z.to(acc) * _channel(dsumsq, acc)
        g = g.to(z.dtype)
    g = g.contiguous(memory_format=torch.channels_last)

    inp = x
    if prologue:
        xa = x.to(acc)
        a = xa * _channel(in_scale, acc)
        if in_shift is not None:
            a = a + _channel(in_shift, acc)
        mask = a > 0 if in_relu else None
        if need_w:
            inp = (torch.relu(a) if in_relu else a).to(x.dtype)
    dinp = conv_dgrad(g, weight, x.shape, stride, padding, dilation, groups) if (
        need_x or need_sc or need_sh) else None
    dw = conv_wgrad(g, inp, weight.shape, stride, padding, dilation, groups) if need_w else None
    if dw is not None:
        dw = dw.contiguous(memory_format=reference.memory_format_of(weight))
    if not prologue:
        return (dinp if need_x else None), dw, None, None
    da = None if dinp is None else dinp.to(acc)
    if da is not None and mask is not None:
        da = torch.where(mask, da, torch.zeros((), dtype=acc, device=da.device))
    dx = (da * _channel(in_scale, acc)).to(x.dtype) if need_x else None
    dsc = (da * xa).sum(dim=(0, 2, 3)).to(in_scale.dtype) if need_sc else None
    dsh = da.sum(dim=(0, 2, 3)).to(in_shift.dtype) if need_sh and in_shift is not None else None
    return dx, dw, dsc, dsh


def _bn_op(name: str, t: torch.Tensor):
    """The BN op this backend runs for t (dispatch.TABLE's cudnn entries)."""
    return dispatch.kernel(name, "cudnn", t.device.type)


def conv_bn_train(
    x: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | None,
    eps: float,
    residual: torch.Tensor | None = None,
    relu: bool = True,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training forward of conv -> BatchNorm (batch statistics) [-> + residual]
    [-> ReLU]: conv_genstats, then the C++ bn_finalize (PyTorch's running-stat
    update, in place) and bn_apply.

    Batch variance comes from the graph's sums as E[z^2] - E[z]^2 in fp32
    (clamped at 0), less robust than a Welford pass when |mean| >> std.
    Returns (y, z, mean, invstd, relu_mask) — what bn_backward needs. Forward
    only (no autograd of its own); the `cudnn` blocks train through
    conv_genstats (differentiable) + ops.batch_norm_act instead."""
    z, s, sq = conv_genstats(x, weight, None, None, False, stride, padding, dilation, groups)
    count = z.numel() // z.shape[1]
    mean, var = bn_math.moments_from_sums(s, sq, count)
    scale, shift, invstd = _bn_op("bn_finalize", z)(
        mean, var, count, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps)
    y, mask = _bn_op("bn_apply", z)(z, scale, shift, residual, relu)
    return y, z, mean, invstd, mask


def conv_dgrad(dy, weight, x_size, stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """d loss / d x of conv2d(x, weight) given dy = d loss / d output (channels_last)."""
    s, p, d = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if _runs_native(dy):
        return torch.ops.fused_resnet.cudnn_conv_dgrad(dy, weight, list(x_size), s, p, d, groups)
    x = torch.empty(x_size, dtype=dy.dtype, device=dy.device)
    dx, _, _ = torch.ops.aten.convolution_backward(dy, x, weight, None, s, p, d, False, [0, 0], groups,
                                                   [True, False, False])
    return dx.contiguous(memory_format=torch.channels_last)


def conv_wgrad(dy, x, weight_size, stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """d loss / d weight of conv2d(x, weight) given dy (channels_last result)."""
    s, p, d = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if _runs_native(dy):
        return torch.ops.fused_resnet.cudnn_conv_wgrad(dy, x, list(weight_size), s, p, d, groups)
    w = torch.empty(weight_size, dtype=x.dtype, device=x.device)
    _, dw, _ = torch.ops.aten.convolution_backward(dy, x, w, None, s, p, d, False, [0, 0], groups,
                                                   [False, True, False])
    return dw.contiguous(memory_format=torch.channels_last)


def _cache_op(name: str):
    if not built():
        raise RuntimeError(
            f"fused_resnet.cudnn: {name} needs the cudnn backend, which was not built here: "
            f"{dispatch.availability()['cudnn'].reason}")
    return getattr(torch.ops.fused_resnet, name)


def graph_key(variant: str, tensors, params) -> str:
    """The cache key the C++ side uses for a graph over these operands
    (None for an absent optional operand) and integer parameters."""
    return _cache_op("cudnn_graph_key")(variant, list(tensors), [int(p) for p in params])


def cache_stats() -> dict[str, int]:
    """The process-wide graph cache: entries, hits, builds, refusals."""
    entries, hits, builds, refusals = _cache_op("cudnn_cache_stats")()
    return {"entries": entries, "hits": hits, "builds": builds, "refusals": refusals}


def fallbacks() -> list[tuple[str, str]]:
    """(graph key, cuDNN's reason) for every graph cuDNN refused in this
    process: those layers ran as aten conv + an fp32 epilogue. The key names
    the variant, device, operands (dtype[sizes]s[strides]aN) and parameters."""
    if not built():
        return []
    return [tuple(line.split("\t", 1)) for line in torch.ops.fused_resnet.cudnn_fallbacks()]


def clear_cache() -> None:
    """Forget every built graph and refusal (and the statistics)."""
    _cache_op("cudnn_cache_clear")()
