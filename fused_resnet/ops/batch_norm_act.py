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
"""

from __future__ import annotations

import math

import torch

from .. import _backend
from . import reference
from ._dispatch import native_op, use_native
from .bn_finalize import bn_finalize
from .bn_stats import bn_stats


def _apply(z, scale, shift, residual, relu, backend):
    if use_native("bn_apply", z, backend):
        return native_op("bn_apply")(z, scale, shift, residual, relu, None)
    return reference.bn_apply(z, scale, shift, residual, relu, None)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    # weight and bias are inputs only so that autograd routes their gradients
    # here; their values are already folded into scale/shift.
    return _apply(z, scale, shift, residual, relu, backend)


@_batch_norm_act_op.register_fake
def _(z, weight, bias, residual, mean, invstd, scale, shift, relu, batch_stats, backend):
    fmt = reference.memory_format_of(z)
    n = (z.numel() + 7) // 8 if relu else 0
    return torch.empty_like(z, memory_format=fmt), z.new_empty((n,), dtype=torch.uint8)


def _setup(ctx, inputs, output):
    z, weight, bias, residual, mean, invstd, scale, shift, relu, batch_stats, backend = inputs
    _, mask = output
    ctx.mark_non_differentiable(mask)
    ctx.batch_stats = batch_stats
    ctx.backend = backend
    ctx.has_weight = weight is not None
    ctx.dtypes = tuple(t.dtype if t is not None else None for t in (weight, bias, residual))
    ctx.save_for_backward(z, mask, mean, invstd, weight)


def _backward(ctx, dy, _dmask):
    z, mask, mean, invstd, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    args = (dy.contiguous(memory_format=reference.memory_format_of(z)), z, mask, mean, invstd, weight,
            ctx.batch_stats, bool(need[3]))
    if use_native("bn_backward", z, ctx.backend):
        dz, dres, dw, db = native_op("bn_backward")(*args)
    else:
        dz, dres, dw, db = reference.bn_backward(*args)
    wdt, bdt, rdt = ctx.dtypes
    return (
        dz if need[0] else None,
        dw.to(wdt) if need[1] else None,
        db.to(bdt) if need[2] else None,
        dres.to(rdt) if need[3] else None,
        None, None, None, None, None, None, None,
    )


_batch_norm_act_op.register_autograd(_backward, setup_context=_setup)


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
    chosen = _backend.resolve(backend, z.device)
    use_batch = training or (running_mean is None and running_var is None)
    acc = reference.stat_dtype(z.dtype)
    count = math.prod(z.shape) // z.shape[1] if z.dim() >= 2 and z.shape[1] else 0
    with torch.no_grad():
        if use_batch:
            _check_batch_size(z)
            if batch_mean is None or batch_var is None:
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
            scale, shift, invstd = bn_finalize(
                mean, var, count, weight, bias,
                running_mean if update else None, running_var if update else None,
                num_batches_tracked if update else None, momentum, eps, backend=chosen)
        else:
            mean = running_mean.to(acc)
            scale, shift, invstd = bn_finalize(
                mean, running_var.to(acc), count, weight, bias, None, None, None, momentum, eps, backend=chosen)
    y, _ = _batch_norm_act_op(z, weight, bias, residual, mean, invstd, scale, shift, relu, use_batch, chosen)
    return y
