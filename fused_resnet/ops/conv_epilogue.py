"""The epilogue every Triton conv op shares (conv2d_bn_act,
conv2d_prologue_bn_act, conv2d_bias_act_shortcut): argument checks, the
aten computation of the contract (what runs where the Triton kernel cannot),
the output shapes for fake kernels, and the epilogue's backward (ReLU mask,
residual, scale, shift, the statistics' gradients through z)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import conv_args, reference


def pair(v, what: str, op: str = "conv2d_bn_act") -> list[int]:
    return conv_args.pair(v, what, op)


out_hw = conv_args.out_hw


def aten_path(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, emit_stats):
    """conv2d_bn_act's contract with F.conv2d and the reference epilogue:
    what the op computes where the Triton kernel cannot run."""
    y, s, q = reference.conv2d_bn_act(x, weight, scale, shift, residual, relu, stride, padding, dilation,
                                      groups, emit_stats)
    # Outputs of a custom op may not alias each other: the empty sums are one
    # tensor in the reference.
    return y.contiguous(memory_format=torch.channels_last), s, (q.clone() if q is s else q)


def fake_outputs(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, emit_stats):
    """The outputs' shapes and dtypes, for fake kernels."""
    torch._check(x.dim() == 4 and weight.dim() == 4, lambda: "conv2d_bn_act: `x` and `weight` must be 4-D")
    oh, ow = out_hw(x.shape, weight.shape, stride, padding, dilation)
    c_out = weight.shape[0]
    y = torch.empty((x.shape[0], c_out, oh, ow), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    sd = reference.stat_dtype(x.dtype)
    n = c_out if emit_stats else 0
    return y, x.new_empty((n,), dtype=sd), x.new_empty((n,), dtype=sd)


def save_epilogue_context(ctx, scale, shift, residual, relu, stride, padding, dilation, groups, emit_stats) -> None:
    """The non-tensor state epilogue_backward reads from ctx (the caller
    saves the tensors)."""
    ctx.conv_args = (list(stride), list(padding), list(dilation), groups)
    ctx.relu = relu
    ctx.has_scale, ctx.has_shift, ctx.has_residual = scale is not None, shift is not None, residual is not None
    ctx.emit_stats = emit_stats
    ctx.shift_dtype = shift.dtype if shift is not None else None
    ctx.res_dtype = residual.dtype if residual is not None else None
    # No epilogue: the output is the raw conv output z, which the statistics'
    # backward needs; saved (callers keep it alive anyway: the next layer
    # reads it) instead of recomputed with a second conv.
    ctx.y_is_z = not relu and scale is None and shift is None and residual is None
    # Unused outputs (often the statistics) then arrive as None, so their
    # backward, which needs z and so a second conv, is skipped.
    ctx.set_materialize_grads(False)


def saves_output(ctx) -> bool:
    """Whether the op's output is saved for backward: for the ReLU's mask,
    or as z for the statistics' backward (ctx.y_is_z)."""
    return ctx.relu or (ctx.y_is_z and ctx.emit_stats)


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def epilogue_backward(ctx, x, weight, scale, y, gy, gsum, gsumsq, needs):
    """Gradients of conv2d_bn_act's contract (x the conv's input as read, ctx
    set by save_epilogue_context): (dx, dweight, dscale, dshift, dresidual),
    each None unless needs[i] (needs: x, weight, scale, shift, residual). The
    ReLU from y, the statistics' gradients (gsum, gsumsq; None when unused)
    through z."""
    dz, d_scale, d_shift, d_residual = epilogue_grad_z(ctx, x, weight, scale, y, gy, gsum, gsumsq, needs[2:])
    dx = dw = None
    if needs[0] or needs[1]:
        stride, padding, dilation, groups = ctx.conv_args
        dx, dw, _ = torch.ops.aten.convolution_backward(
            dz.to(x.dtype), x, weight, None, stride, padding, dilation, False, [0, 0], groups,
            [needs[0], needs[1], False],
        )
    return dx, dw, d_scale, d_shift, d_residual


def _needs_z(ctx, gsum, gsumsq, need_scale) -> bool:
    # The raw conv output z enters the statistics' and the scale's gradients.
    return (ctx.emit_stats and (gsum is not None or gsumsq is not None)) or (ctx.has_scale and need_scale)


def _saved_z(ctx, y) -> bool:
    # The saved output is z itself (no epilogue; see save_epilogue_context).
    return ctx.y_is_z and y is not None


def recomputes_z(ctx, y, gsum, gsumsq, need_scale: bool) -> bool:
    """Whether epilogue_grad_z recomputes z with a second conv of its input:
    z is needed and the saved output y is not z itself."""
    return _needs_z(ctx, gsum, gsumsq, need_scale) and not _saved_z(ctx, y)


def epilogue_grad_z(ctx, x, weight, scale, y, gy, gsum, gsumsq, needs):
    """The epilogue's half of epilogue_backward: (dz, dscale, dshift,
    dresidual), dz = dL/d(raw conv output) in op-math precision; needs:
    scale, shift, residual. x is read only to recompute z, when z is needed
    and y is not z."""
    stride, padding, dilation, groups = ctx.conv_args
    relu, has_scale, has_shift, has_residual = ctx.relu, ctx.has_scale, ctx.has_shift, ctx.has_residual
    emit_stats, shift_dtype, res_dtype = ctx.emit_stats, ctx.shift_dtype, ctx.res_dtype
    acc = reference.stat_dtype(x.dtype)
    oh, ow = out_hw(x.shape, weight.shape, stride, padding, dilation)
    out_shape = (x.shape[0], weight.shape[0], oh, ow)

    g = gy.to(acc) if gy is not None else torch.zeros(out_shape, dtype=acc, device=x.device)
    if relu:
        g = torch.where(y > 0, g, torch.zeros((), dtype=acc, device=g.device))
    d_residual = g.to(res_dtype) if has_residual and needs[2] else None
    d_shift = g.sum(dim=(0, 2, 3)).to(shift_dtype) if has_shift and needs[1] else None

    z = None
    if _needs_z(ctx, gsum, gsumsq, needs[0]):
        z = y.to(acc) if _saved_z(ctx, y) else F.conv2d(x.detach(), weight.detach(), None, stride, padding,
                                                        dilation, groups).to(acc)
    d_scale = (g * z).sum(dim=(0, 2, 3)).to(scale.dtype) if has_scale and needs[0] else None

    dz = g * _per_channel(scale.to(acc)) if has_scale else g
    if emit_stats and gsum is not None:
        dz = dz + _per_channel(gsum.to(acc))
    if emit_stats and gsumsq is not None:
        dz = dz + 2.0 * z * _per_channel(gsumsq.to(acc))
    return dz, d_scale, d_shift, d_residual


def check_tensors(x, weight, residual, stride, padding, dilation) -> None:
    # aten's own messages for these name no argument (or, for a 3-D x, it
    # silently runs an unbatched conv), so say which one is wrong here.
    if x.dim() != 4:
        raise ValueError(f"conv2d_bn_act: `x` must be 4-D (N, C_in, H, W), got shape {list(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"conv2d_bn_act: `weight` must be 4-D (C_out, C_in / groups, KH, KW), "
                         f"got shape {list(weight.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"conv2d_bn_act: `x` must be a floating-point tensor, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"conv2d_bn_act: `weight` has dtype {weight.dtype} but `x` has {x.dtype}; expected the same")
    if weight.device != x.device:
        raise ValueError(f"conv2d_bn_act: `weight` is on {weight.device} but `x` is on {x.device}; expected the same")
    if residual is not None:
        oh, ow = out_hw(x.shape, weight.shape, stride, padding, dilation)
        want = [x.shape[0], weight.shape[0], oh, ow]
        if list(residual.shape) != want:
            raise ValueError(f"conv2d_bn_act: `residual` must have the output's shape {want}, "
                             f"got {list(residual.shape)}")
