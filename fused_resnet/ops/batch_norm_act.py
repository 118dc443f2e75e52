"""The differentiable training/eval BatchNorm + residual add + ReLU used by the
fused blocks: eager's `relu(F.batch_norm(z, ...) + residual)` including
nn.BatchNorm2d's module-level running-statistic rules, in fused passes.

How it is put together (so torch.compile(fullgraph=True) traces it whole):
  1. batch statistics (bn_stats, or the conv epilogue's batch_mean/batch_var)
     and bn_finalize, which updates the running statistics in place (a
     mutating op: functionalised by torch.compile, never differentiated);
  2. the functional custom op fused_resnet::batch_norm_act, which applies
     scale/shift (+ residual) (+ ReLU), saves z, the 1-bit mask, mean and
     invstd (not y, not xhat), and whose registered backward is bn_backward.
     Its backward carries the whole BatchNorm gradient, including the
     statistics' dependence on z, so step 1 runs on detached tensors.
PyTorch does not allow an autograd formula on an op that mutates its inputs,
which is why the running-statistic update is a separate op (step 1).

Outside torch.compile, when every step has a native kernel for the device,
the same steps run through the kernels directly and a torch.autograd.Function
(`_NativeBatchNormAct`): a torch.library custom op's Python dispatch costs
~0.2 ms per call, which at ResNet-50's last-stage shapes on a CPU is as much
as the kernels themselves. Same kernels, same saved tensors, same numbers.
"""

from __future__ import annotations

import math

import torch

from .. import _compat, config, dispatch
from . import reference
from .bn_finalize import bn_finalize, bump_versions
from .bn_stats import bn_stats
from .relu_mask import relu_mask


def apply_on_backend(z, scale, shift, residual, relu, backend):
    """bn_apply on a resolved backend (the forward of batch_norm_act's op and
    of the synchronised one)."""
    return dispatch.kernel("bn_apply", backend, z.device.type)(z, scale, shift, residual, relu, None)


@torch.library.custom_op("fused_resnet::batch_norm_act", mutates_args=())
def _batch_norm_act_op(
    z: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    relu: bool,
    batch_stats: bool,
    backend: str,
    reuse_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    # weight and bias are inputs only so that autograd routes their gradients
    # here; their values are already folded into scale/shift.
    return apply_on_backend(z, scale, shift, residual, relu, backend)


@_batch_norm_act_op.register_fake
def _(z, weight, bias, residual, mean, invstd, scale, shift, relu, batch_stats, backend, reuse_output=False):
    fmt = reference.memory_format_of(z)
    n = (z.numel() + 7) // 8 if relu else 0
    return torch.empty_like(z, memory_format=fmt), z.new_empty((n,), dtype=torch.uint8)


def _setup(ctx, inputs, output):
    z, weight, bias, residual, mean, invstd, scale, shift, relu, batch_stats, backend, reuse_output = inputs
    y, mask = output
    ctx.mark_non_differentiable(mask)
    ctx.batch_stats = batch_stats
    ctx.backend = backend
    ctx.reuse_output = reuse_output and relu
    ctx.dtypes = tuple(t.dtype if t is not None else None for t in (weight, bias, residual))
    ctx.save_for_backward(z, y if ctx.reuse_output else mask, mean, invstd, weight)


def _mask_by_output(dy: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy, the ReLU mask) from the saved ReLU output, as eager's
    threshold_backward decides (y <= 0 gives 0): the packed mask costs one
    read of y, then the fused backward runs as in "mask" mode."""
    return dy, relu_mask(y)


def _backward(ctx, dy, _dmask):
    z, mask, mean, invstd, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    dy = dy.contiguous(memory_format=reference.memory_format_of(z))
    if ctx.reuse_output:
        dy, mask = _mask_by_output(dy, mask)
    args = (dy, z, mask, mean, invstd, weight, ctx.batch_stats, bool(need[3]))
    dz, dres, dw, db = dispatch.kernel("bn_backward", ctx.backend, z.device.type)(*args)
    wdt, bdt, rdt = ctx.dtypes
    return (
        dz if need[0] else None,
        _as_dtype(dw, wdt) if need[1] else None,
        _as_dtype(db, bdt) if need[2] else None,
        _as_dtype(dres, rdt) if need[3] else None,
        None, None, None, None, None, None, None, None,
    )


_batch_norm_act_op.register_autograd(_backward, setup_context=_setup)


_NATIVE_STEPS = ("bn_stats", "bn_finalize", "bn_apply", "bn_backward", "relu_mask")


def _native_steps(chosen: str, z: torch.Tensor) -> bool:
    """Whether every step runs its C++/CUDA kernel on this backend and device
    (the direct autograd.Function path), outside torch.compile."""
    if torch.compiler.is_compiling():
        return False
    return all(dispatch.runs_native(op, chosen, z.device.type) for op in _NATIVE_STEPS)


# The ops' Python autograd registrations (refusals of double backward) would
# route every call through Python; inside _NativeBatchNormAct, autograd is
# ours, so dispatch straight to the kernels, as torch.library's own autograd
# wrapper does.
_below_autograd = _compat.below_autograd


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Tensor.to's argument parsing costs more than the comparison, and these
    # gradients are almost always in the right dtype already (host time per
    # call matters at the small stages on a GPU, where kernels are short).
    return t if t.dtype == dtype else t.to(dtype)


class _NativeBatchNormAct(torch.autograd.Function):
    """fused_resnet::batch_norm_act's forward and backward on the native
    kernels, without the custom-op dispatch (eager mode only)."""

    @staticmethod
    def forward(ctx, z, weight, bias, residual, mean, invstd, scale, shift, relu, batch_stats, reuse_output):
        with _below_autograd():
            y, mask = torch.ops.fused_resnet.bn_apply.default(z, scale, shift, residual, relu, None)
        ctx.batch_stats = batch_stats
        ctx.reuse_output = reuse_output and relu
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (weight, bias, residual))
        ctx.save_for_backward(z, y if ctx.reuse_output else mask, mean, invstd, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        z, mask, mean, invstd, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        with _below_autograd():
            if ctx.reuse_output:  # `mask` holds the saved ReLU output: pack its mask (_mask_by_output)
                mask = torch.ops.fused_resnet.relu_mask.default(mask)
            dz, dres, dw, db = torch.ops.fused_resnet.bn_backward.default(
                dy, z, mask, mean, invstd, weight, ctx.batch_stats, bool(need[3]))
        wdt, bdt, rdt = ctx.dtypes
        return (
            dz if need[0] else None,
            _as_dtype(dw, wdt) if need[1] else None,
            _as_dtype(db, bdt) if need[2] else None,
            _as_dtype(dres, rdt) if need[3] else None,
            None, None, None, None, None, None, None,
        )


def _finalize(native, chosen, mean, var, count, weight, bias, running_mean, running_var, nbt, momentum, eps):
    if not native:
        return bn_finalize(mean, var, count, weight, bias, running_mean, running_var, nbt, momentum, eps,
                           backend=chosen)
    out = torch.ops.fused_resnet.bn_finalize.default(mean, var, count, weight, bias, running_mean, running_var, nbt,
                                                      momentum, eps)
    bump_versions(running_mean, running_var)
    return out


def _check_batch_size(z: torch.Tensor) -> None:
    # F.batch_norm's own check and message (torch.nn.functional._verify_batch_size).
    size_prods = z.size(0)
    for i in range(z.dim() - 2):
        size_prods *= z.size(i + 2)
    if size_prods == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {z.size()}")


def batch_norm_act(
    z: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    *,
    training: bool,
    momentum: float | None,
    eps: float,
    residual: torch.Tensor | None = None,
    relu: bool = True,
    batch_mean: torch.Tensor | None = None,
    batch_var: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """y = [relu](batch_norm(z) [+ residual]), exactly as an nn.BatchNorm2d
    module followed by `+ residual` and ReLU would compute it.

    Pass the module's own attributes, unchanged:
        batch_norm_act(z, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                       bn.num_batches_tracked, training=bn.training,
                       momentum=bn.momentum, eps=bn.eps, residual=r)
    (running_mean/var/num_batches_tracked are None for
    track_running_stats=False; weight/bias None for affine=False). The module
    rules are applied here: batch statistics are used when training or when
    there are no running statistics; the running statistics (and
    num_batches_tracked) are updated only when training and present;
    momentum=None means the cumulative average 1 / num_batches_tracked after
    its increment; running_var receives the unbiased variance.

    Args:
        z: (N, C, ...) fp32/fp16/bf16/fp64, contiguous or channels_last.
        residual: None or z's shape; added after BN in z's dtype (as eager).
        relu: apply ReLU (False: plain BN [+ residual]).
        batch_mean, batch_var: per-channel mean and biased variance of z when
            a conv epilogue already produced them (skips bn_stats).
        backend: None (the global choice) or a backend name.

    Returns y in z's dtype and memory format. Differentiable in z, weight,
    bias and residual (each optional). BN parameters and statistics stay in
    fp32 for fp16/bf16 z (autocast). Raises ValueError, as F.batch_norm does,
    for a single value per channel when using batch statistics.
    """
    chosen = dispatch.resolve(backend, z.device)
    native = _native_steps(chosen, z)
    use_batch = training or (running_mean is None and running_var is None)
    acc = reference.stat_dtype(z.dtype)
    count = math.prod(z.shape) // z.shape[1] if z.dim() >= 2 and z.shape[1] else 0
    with torch.no_grad():
        if use_batch:
            _check_batch_size(z)
            if batch_mean is None or batch_var is None:
                if native:
                    with _below_autograd():
                        mean, var = torch.ops.fused_resnet.bn_stats.default(z.detach())
                else:
                    mean, var = bn_stats(z.detach(), backend=chosen)
            else:
                mean, var = batch_mean.detach().to(acc), batch_var.detach().to(acc)
            update = training and running_mean is not None
            if z.numel() == 0:
                # aten's batch_norm leaves the running statistics untouched
                # for an empty batch (the module still counts it); the mean
                # of nothing would write NaN into them.
                if update and num_batches_tracked is not None:
                    num_batches_tracked.add_(1)
                update = False
                mean, var = torch.zeros_like(mean), torch.zeros_like(var)
            scale, shift, invstd = _finalize(
                native, chosen, mean, var, count, weight, bias,
                running_mean if update else None, running_var if update else None,
                num_batches_tracked if update else None, momentum, eps)
        else:
            mean = running_mean.to(acc)
            scale, shift, invstd = _finalize(
                native, chosen, mean, running_var.to(acc), count, weight, bias, None, None, None, momentum, eps)
    reuse = relu and config.relu_saves() == "output"
    if native:
        return _NativeBatchNormAct.apply(z, weight, bias, residual, mean, invstd, scale, shift, relu, use_batch,
                                         reuse)
    y, _ = _batch_norm_act_op(z, weight, bias, residual, mean, invstd, scale, shift, relu, use_batch, chosen, reuse)
    return y
