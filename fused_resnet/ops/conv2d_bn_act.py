"""conv2d + per-channel scale/shift (folded or batch-statistics BN) + residual
add + ReLU in one Triton kernel, optionally emitting the per-channel sum and
sum of squares of the raw conv output for BatchNorm's batch statistics.

The op fused_resnet::conv2d_bn_act is defined here, from Python (it has no
C++ kernel): a torch.library.custom_op with a fake kernel, so
torch.compile(fullgraph=True) traces through it as one opaque node, and a
registered autograd formula: the epilogue's backward (ReLU mask, residual
gradient, d(scale), d(shift), the statistics' gradients) composed with
aten.convolution_backward for dgrad and wgrad.

conv2d_bias_act_shortcut (op fused_resnet::conv2d_bias_act_shortcut) is the
inference-only variant for a residual block's last conv with a projection
shortcut: the downsample 1x1 conv is a second GEMM accumulated into the same
tile (one kernel, one write, no shortcut tensor). It has no backward: where a
gradient is wanted it computes the same contract with differentiable aten ops.

Where the Triton kernel cannot run (a CPU tensor without TRITON_INTERPRET=1,
fp64, bf16 under the interpreter, which computes bf16 dots wrongly) the op
computes the same contract with F.conv2d + the reference epilogue.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import _backend, _compat, _conv_args
from . import reference

_OP = "fused_resnet::conv2d_bn_act"


def _pair(v, what: str) -> list[int]:
    return _conv_args.pair(v, what, "conv2d_bn_act")


_out_hw = _conv_args.out_hw


def _triton_runs(x: torch.Tensor) -> bool:
    """Whether the Triton kernel (rather than the aten path) runs for x."""
    av = _backend.availability()
    if x.device.type == "cuda":
        return av["triton"].available and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    if x.device.type == "cpu" and _backend.triton_interpreter_on() and av["triton-interpreter"].available:
        return x.dtype in (torch.float16, torch.float32)
    return False


def _aten_path(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, emit_stats):
    y, s, q = reference.conv2d_bn_act(x, weight, scale, shift, residual, relu, stride, padding, dilation,
                                      groups, emit_stats)
    # Outputs of a custom op may not alias each other: the empty sums are one
    # tensor in the reference.
    return y.contiguous(memory_format=torch.channels_last), s, (q.clone() if q is s else q)


@torch.library.custom_op(_OP, mutates_args=())
def _conv2d_bn_act_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    relu: bool,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    emit_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _triton_runs(x):
        from ..triton import launch

        return launch.conv2d_bn_act(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups,
                                    emit_stats)
    return _aten_path(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, emit_stats)


@_conv2d_bn_act_op.register_fake
def _conv2d_bn_act_fake(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, emit_stats):
    torch._check(x.dim() == 4 and weight.dim() == 4, lambda: "conv2d_bn_act: `x` and `weight` must be 4-D")
    oh, ow = _out_hw(x.shape, weight.shape, stride, padding, dilation)
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


def _setup_context(ctx, inputs, output):
    x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, emit_stats = inputs
    save_epilogue_context(ctx, scale, shift, residual, relu, stride, padding, dilation, groups, emit_stats)
    ctx.save_for_backward(x, weight, scale, output[0] if saves_output(ctx) else None)


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
    oh, ow = _out_hw(x.shape, weight.shape, stride, padding, dilation)
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


def _backward(ctx, gy, gsum, gsumsq):
    x, weight, scale, y = ctx.saved_tensors
    dx, dw, d_scale, d_shift, d_residual = epilogue_backward(ctx, x, weight, scale, y, gy, gsum, gsumsq,
                                                             ctx.needs_input_grad[:5])
    return dx, dw, d_scale, d_shift, d_residual, None, None, None, None, None, None


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)


def _check_tensors(x, weight, residual, stride, padding, dilation) -> None:
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
        oh, ow = _out_hw(x.shape, weight.shape, stride, padding, dilation)
        want = [x.shape[0], weight.shape[0], oh, ow]
        if list(residual.shape) != want:
            raise ValueError(f"conv2d_bn_act: `residual` must have the output's shape {want}, "
                             f"got {list(residual.shape)}")


def _use_triton_op(backend: str | None, x: torch.Tensor) -> bool:
    choice = backend.strip().lower() if backend is not None else _backend.get_backend()
    if choice == "reference":
        return False
    # The Triton kernel is this op's only fused implementation, so "auto"
    # means it wherever it can run.
    if choice == "auto":
        choice = "triton"
    return _backend.resolve(choice, x.device) == "triton"


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
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = [relu](conv2d(x, weight) * scale + shift [+ residual]), one kernel.

    Args:
        x: (N, C_in, H, W), float16/bfloat16/float32 for the Triton kernel
            (any float dtype on the aten path); channels_last is the layout
            the kernel reads, anything else is converted first.
        weight: (C_out, C_in / groups, KH, KW), x's dtype.
        scale, shift: optional per-output-channel (C_out,) tensors, used in
            fp32 (folded BN, or BN with known batch statistics).
        residual: optional tensor of the output's shape, added after shift.
        relu: apply ReLU last.
        stride, padding, dilation, groups: as F.conv2d (ints or pairs).
        emit_stats: also return sum and sum of squares over (N, H, W) of the
            raw conv output z, in fp32 (fp64 for fp64), reduced deterministically.
        backend: None (the global choice; "auto" means Triton where it can
            run), "triton", or "reference" (F.conv2d + the eager epilogue).

    Returns (y, sum, sumsq); y is channels_last in x's dtype; sum and sumsq are
    empty when emit_stats is False. Differentiable in x, weight, scale, shift,
    residual and through the statistics.
    """
    if backend is not None and backend.strip().lower() not in _backend.BACKENDS + ("auto",):
        _backend.validate(backend)  # raises BackendError naming the choices
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"conv2d_bn_act: `groups` must be a positive int, got {groups!r}")
    _check_tensors(x, weight, residual, stride, padding, dilation)
    if not _use_triton_op(backend, x):
        return reference.conv2d_bn_act(x, weight, scale, shift, residual, bool(relu), stride, padding, dilation,
                                       groups, bool(emit_stats))
    return torch.ops.fused_resnet.conv2d_bn_act(x, weight, scale, shift, residual, bool(relu), stride, padding,
                                                dilation, groups, bool(emit_stats))


# ------------------------------------------- projection shortcut (inference only)

_SC_OP = "fused_resnet::conv2d_bias_act_shortcut"


@torch.library.custom_op(_SC_OP, mutates_args=())
def _shortcut_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    x2: torch.Tensor,
    weight2: torch.Tensor,
    stride2: Sequence[int],
    relu: bool,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    if _triton_runs(x):
        from ..triton import launch

        y, _, _ = launch.conv2d_bn_act(x, weight, None, bias, None, relu, stride, padding, dilation, groups, False,
                                       x2=x2, weight2=weight2, stride2=stride2)
        return y
    y = reference.conv2d_bias_act_shortcut(x, weight, bias, x2, weight2, stride2, relu, stride, padding, dilation,
                                           groups)
    return y.contiguous(memory_format=torch.channels_last)


@_shortcut_op.register_fake
def _shortcut_fake(x, weight, bias, x2, weight2, stride2, relu, stride, padding, dilation, groups):
    torch._check(x.dim() == 4 and weight.dim() == 4 and x2.dim() == 4 and weight2.dim() == 4,
                 lambda: "conv2d_bias_act_shortcut: `x`, `weight`, `x2` and `weight2` must be 4-D")
    oh, ow = _out_hw(x.shape, weight.shape, stride, padding, dilation)
    return torch.empty((x.shape[0], weight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """y = [relu](conv2d(x, weight) + conv1x1(x2, weight2, stride2) + bias),
    inference only: a residual block's last conv (BN folded into `weight`)
    with its projection shortcut (the downsample conv, its BN folded into
    `weight2`) computed as a second GEMM into the same accumulator, and one
    bias, the two folded biases summed. One kernel, one write.

    Args:
        x: (N, C_in, H, W), the last conv's input; float16/float32 (bfloat16 on
            a GPU) for the Triton kernel.
        weight: (C_out, C_in / groups, KH, KW), x's dtype.
        bias: optional (C_out,), used in fp32.
        x2: (N, C2, H2, W2), the block input, x's dtype.
        weight2: (C_out, C2, 1, 1), x's dtype.
        stride2: the shortcut's stride (no padding, one group); its output
            must have the main conv's shape.
        relu, stride, padding, dilation, groups: as conv2d_bn_act.
        backend: None (the global choice; "auto" means Triton where it can
            run), "triton", or "reference".

    Returns y, channels_last in x's dtype. There is no backward: when
    autograd is recording and an input requires grad, the unfused,
    differentiable reference (reference.conv2d_bias_act_shortcut) runs.
    """
    op = "conv2d_bias_act_shortcut"
    if backend is not None and backend.strip().lower() not in _backend.BACKENDS + ("auto",):
        _backend.validate(backend)  # raises BackendError naming the choices
    stride, padding, dilation = (_conv_args.pair(stride, "stride", op), _conv_args.pair(padding, "padding", op),
                                 _conv_args.pair(dilation, "dilation", op))
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: `groups` must be a positive int, got {groups!r}")
    _check_tensors(x, weight, None, stride, padding, dilation)
    oh, ow = _out_hw(x.shape, weight.shape, stride, padding, dilation)
    stride2 = list(_conv_args.check_shortcut(x, x2, weight2, stride2, (x.shape[0], weight.shape[0], oh, ow), op))
    if bias is not None and bias.numel() != weight.shape[0]:
        raise ValueError(f"{op}: `bias` must have {weight.shape[0]} elements (one per output channel), "
                         f"got {bias.numel()}")
    if _wants_grad(x, weight, bias, x2, weight2) or not _use_triton_op(backend, x):
        return reference.conv2d_bias_act_shortcut(x, weight, bias, x2, weight2, stride2, bool(relu), stride,
                                                  padding, dilation, groups)
    return torch.ops.fused_resnet.conv2d_bias_act_shortcut(x, weight, bias, x2, weight2, stride2, bool(relu),
                                                           stride, padding, dilation, groups)


# Depends only on the device type, the dtype and the environment: torch.compile
# may fold it to a constant (its tracer cannot enter availability()'s cache).
@_compat.assume_constant_result
def _kernel_runs_on(device_type: str, dtype_name: str) -> bool:
    return _triton_runs(_DeviceAndDtype(torch.device(device_type), getattr(torch, dtype_name)))


class _DeviceAndDtype:
    """What _triton_runs reads of a tensor: its device and dtype."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype


def shortcut_kernel_runs(x: torch.Tensor, backend: str | None = None) -> bool:
    """Whether conv2d_bias_act_shortcut would run the fused Triton kernel (not
    the reference) for an input like x on `backend`, autograd aside."""
    return _use_triton_op(backend, x) and _kernel_runs_on(x.device.type, str(x.dtype).replace("torch.", ""))
