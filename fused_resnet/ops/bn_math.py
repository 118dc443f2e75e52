"""BatchNorm arithmetic every path shares: moments from per-channel sums,
and scale/shift from moments. Written once; the statistics-from-epilogue
paths (Triton, cuDNN), synchronised BatchNorm and the reference use these."""

from __future__ import annotations

import torch


def moments_from_sums(s: torch.Tensor, ss: torch.Tensor, count) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) from per-channel sums of x and x^2 over `count`
    values: E[x^2] - E[x]^2 clamped at 0, in the sums' dtype (pass fp64 sums
    where cancellation matters), differentiable in both sums. It cancels
    catastrophically when |mean| >> std; a Welford pass (bn_stats) does not."""
    mean = s / count
    return mean, (ss / count - mean * mean).clamp_min(0)


def scale_shift(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, shift, invstd) with bn(x) = x * scale + shift: invstd =
    1 / sqrt(var + eps), scale = weight * invstd (invstd without a weight),
    shift = bias - mean * scale; in mean's dtype, differentiable."""
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(invstd.dtype)
    return scale, shift, invstd
