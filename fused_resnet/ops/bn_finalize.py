"""From batch statistics to BatchNorm's scale/shift/invstd, with nn.BatchNorm's
running-statistic update (in place)."""

from __future__ import annotations

import torch

from .. import _compat, dispatch

if dispatch.native_loaded():

    @torch.library.register_fake("fused_resnet::bn_finalize")
    def _bn_finalize_fake(mean, var, count, weight, bias, running_mean, running_var, num_batches_tracked,
                          momentum, eps):
        torch._check(mean.dim() == 1, lambda: "fused_resnet.bn_finalize: `mean` must be 1-D")
        torch._check(var.shape == mean.shape, lambda: "fused_resnet.bn_finalize: `var` must have mean's shape")
        return torch.empty_like(mean), torch.empty_like(mean), torch.empty_like(mean)


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
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scale, shift, invstd from a batch mean and biased variance over `count`
    values per channel, and the running-statistic update in place.

    invstd = 1 / sqrt(var + eps); scale = weight * invstd (invstd when weight
    is None); shift = bias - mean * scale. When running_mean/running_var are
    given they are updated with PyTorch's rules: num_batches_tracked (if given)
    is incremented first; the factor is `momentum`, or 1 / num_batches_tracked
    when momentum is None; running_var receives the unbiased variance
    var * count / (count - 1). All outputs are in mean's dtype (fp32 or fp64).

    Not differentiable (it mutates its inputs); fused_resnet.ops.batch_norm_act
    owns the gradient of the whole BatchNorm.
    """
    chosen = dispatch.resolve(backend, mean.device)
    out = dispatch.kernel("bn_finalize", chosen, mean.device.type)(mean, var, count, weight, bias, running_mean,
                                                                   running_var, num_batches_tracked, momentum, eps)
    if dispatch.runs_native("bn_finalize", chosen, mean.device.type):
        bump_versions(running_mean, running_var)
    return out


def bump_versions(*tensors) -> None:
    """Mark tensors a native kernel wrote in place as changed.

    The kernels write running statistics through raw pointers, and with no
    autograd kernel registered nothing bumps their version counters, so
    version-keyed caches (the BN fold cache) would keep a stale entry.
    torch.compile functionalises the mutation itself and uses no such cache."""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        if t is not None:
            _compat.bump_version(t)
