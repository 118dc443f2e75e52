"""Synchronised BatchNorm + residual add + ReLU for training on many processes:
nn.SyncBatchNorm's semantics with the fused apply and backward kept.

Forward: each process computes its own per-channel statistics (bn_stats, or
a conv epilogue's), turns them into shifted sums, and ONE all-reduce of
[sum(z - K), sum((z - K)^2), count] (fp64, 2C + 1 values) gives the whole
batch's mean and biased variance; K is the running mean (identical on every
process), so the sums do not lose a small variance under a large mean.
bn_finalize then updates the running statistics with the total count
(unbiased variance, momentum / cumulative average) exactly as nn.BatchNorm2d
does on one process with the concatenated batch. Uneven batches, including
an empty one on some process, are handled by the counts.

Backward: bn_backward_reduce (this process's sum dy' and sum dy' * xhat, which
are its dbias and dweight), ONE all-reduce of those 2C sums, then
bn_backward_elemt with the global sums and count. Parameter gradients stay
local, as nn.SyncBatchNorm returns them (DistributedDataParallel then
averages them like every other parameter gradient).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import dispatch
from . import bn_math, reference
from .batch_norm_act import apply_on_backend
from .bn_backward_elemt import bn_backward_elemt
from .bn_backward_reduce import bn_backward_reduce
from .bn_finalize import bn_finalize
from .bn_stats import bn_stats


def world_size(process_group=None) -> int:
    """Processes in process_group (the default group when None); 1 when
    torch.distributed is not available or not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


class _SyncBatchNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, weight, bias, residual, mean, invstd, scale, shift, relu, backend, process_group, count):
        y, mask = apply_on_backend(z, scale, shift, residual, relu, backend)
        ctx.backend, ctx.process_group, ctx.count = backend, process_group, count
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (weight, bias, residual))
        ctx.save_for_backward(z, mask, mean, invstd, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        z, mask, mean, invstd, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy = dy.contiguous(memory_format=reference.memory_format_of(z))
        sum_dy, sum_dy_xhat = bn_backward_reduce(dy, z, mask, mean, invstd, backend=ctx.backend)
        dz = dres = None
        if need[0] or need[3]:
            if need[0]:
                # One collective for both sums; this process keeps its own
                # (local) sums for the parameter gradients.
                both = torch.cat([sum_dy, sum_dy_xhat])
                dist.all_reduce(both, dist.ReduceOp.SUM, group=ctx.process_group)
                g_sum_dy, g_sum_dy_xhat = both.split(sum_dy.numel())
            else:
                g_sum_dy, g_sum_dy_xhat = sum_dy, sum_dy_xhat
            dz, dres = bn_backward_elemt(dy, z, mask, mean, invstd, weight, g_sum_dy, g_sum_dy_xhat, ctx.count,
                                         bool(need[3]), backend=ctx.backend)
        wdt, bdt, rdt = ctx.dtypes
        return (
            dz if need[0] else None,
            sum_dy_xhat.to(wdt) if need[1] else None,
            sum_dy.to(bdt) if need[2] else None,
            dres.to(rdt) if need[3] else None,
            None, None, None, None, None, None, None, None,
        )


def _global_stats(z, local_mean, local_var, shift_point, process_group):
    """Whole-batch mean, biased variance (fp64) and count from each process's
    statistics, in one all-reduce."""
    n = float(z.numel() // z.shape[1]) if z.shape[1] else 0.0
    c = local_mean.numel()
    k = torch.zeros(c, dtype=torch.float64, device=z.device) if shift_point is None else shift_point.double()
    d = local_mean.double() - k
    packed = torch.cat([n * d, n * (local_var.double() + d * d), torch.full((1,), n, dtype=torch.float64,
                                                                              device=z.device)])
    if n == 0:
        packed.zero_()  # the mean of nothing is NaN; it contributes nothing
    dist.all_reduce(packed, dist.ReduceOp.SUM, group=process_group)
    s1, s2, total = packed[:c], packed[c:2 * c], packed[2 * c]
    total_count = int(total.item())
    if total_count == 0:
        return torch.zeros_like(k), torch.zeros_like(k), 0
    mean_shifted, var = bn_math.moments_from_sums(s1, s2, total)
    return k + mean_shifted, var, total_count


def sync_batch_norm_act(
    z: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    *,
    momentum: float | None,
    eps: float,
    process_group=None,
    residual: torch.Tensor | None = None,
    relu: bool = True,
    batch_mean: torch.Tensor | None = None,
    batch_var: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Training-mode y = [relu](batch_norm(z) [+ residual]) with batch
    statistics over every process of `process_group` (default: the world),
    as nn.SyncBatchNorm followed by `+ residual` and ReLU computes it.

    Every process of the group must call it (it runs collectives: one
    all-reduce forward, one backward when z needs a gradient). Arguments as
    fused_resnet.ops.batch_norm_act; batch_mean/batch_var are this process's
    own statistics when a conv epilogue produced them. The total count is
    read on the host (as nn.SyncBatchNorm does) for the running-variance
    correction and PyTorch's "more than 1 value per channel" check.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fused_resnet.sync_batch_norm_act: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (or use batch_norm_act on one process)")
    chosen = dispatch.resolve(backend, z.device)
    acc = reference.stat_dtype(z.dtype)
    with torch.no_grad():
        c = z.shape[1]
        if z.numel() == 0:
            local_mean = local_var = torch.zeros(c, dtype=acc, device=z.device)
        elif batch_mean is not None and batch_var is not None:
            local_mean, local_var = batch_mean.detach().to(acc), batch_var.detach().to(acc)
        else:
            local_mean, local_var = bn_stats(z.detach(), backend=chosen)
        mean64, var64, total = _global_stats(z, local_mean, local_var, running_mean, process_group)
        if total <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {z.size()} "
                             f"on this process and {total} value(s) per channel over the process group")
        scale, shift, invstd = bn_finalize(mean64.to(acc), var64.to(acc), total, weight, bias, running_mean,
                                           running_var, num_batches_tracked, momentum, eps, backend=chosen)
        mean = mean64.to(acc)
    return _SyncBatchNormAct.apply(z, weight, bias, residual, mean, invstd, scale, shift, relu, chosen,
                                   process_group, total)
