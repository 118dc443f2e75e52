"""The BatchNorm and conv modules the fused units take, and their rules:
which kinds a unit reproduces exactly, which statistics a BatchNorm uses,
and BatchNorm + [add] + [ReLU] with the module's semantics in one op."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops


def is_frozen_bn(bn: nn.Module) -> bool:
    """torchvision.ops.FrozenBatchNorm2d: buffers only, always running statistics."""
    return type(bn).__name__ == "FrozenBatchNorm2d" and all(
        hasattr(bn, a) for a in ("weight", "bias", "running_mean", "running_var", "eps"))


def is_synchronised_bn_class(cls: type) -> bool:
    """fused_resnet.SyncBatchNorm2d (it marks itself; nn.SyncBatchNorm runs
    its own forward)."""
    return getattr(cls, "fused_resnet_sync_batchnorm", False)


def is_batchnorm(bn: nn.Module) -> bool:
    """nn.BatchNorm2d itself, a subclass that keeps its forward, or our
    SyncBatchNorm2d."""
    return isinstance(bn, nn.BatchNorm2d) and (
        type(bn).forward is nn.BatchNorm2d.forward or is_synchronised_bn_class(type(bn)))


def bn_supported(bn: nn.Module) -> bool:
    """A BatchNorm whose forward the fused units reproduce exactly."""
    return is_batchnorm(bn) or is_frozen_bn(bn)


def is_plain_conv(conv: nn.Module) -> bool:
    """An nn.Conv2d with zero padding and its stock forward."""
    return isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and type(conv).forward is nn.Conv2d.forward


def unit_supported(conv: nn.Module, bn: nn.Module) -> bool:
    return is_plain_conv(conv) and bn_supported(bn)


def uses_batch_stats(bn: nn.Module) -> bool:
    """nn.BatchNorm2d.forward's rule: batch statistics in training, and in
    eval too when it tracks no running statistics."""
    if is_frozen_bn(bn):
        return False
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def eval_tensors(bn: nn.Module):
    """(running_mean, running_var, weight, bias, eps) of a BN using running
    statistics (nn.BatchNorm2d or torchvision's FrozenBatchNorm2d)."""
    return bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps


def check_batch_values(z: torch.Tensor) -> None:
    """F.batch_norm's check and text: batch statistics need two values."""
    if z.numel() // max(z.shape[1], 1) <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {z.size()}")


def bn_act(bn: nn.Module, z: torch.Tensor, residual: torch.Tensor | None, relu: bool, backend: str,
           batch_mean: torch.Tensor | None = None, batch_var: torch.Tensor | None = None) -> torch.Tensor:
    """relu?(bn(z) [+ residual]) in one pass with the module's rules: batch
    statistics in training (all-reduced for a synchronised SyncBatchNorm2d;
    batch_mean/batch_var when a conv epilogue already produced them),
    running statistics in eval and for FrozenBatchNorm2d."""
    if not uses_batch_stats(bn):
        rm, rv, weight, bias, eps = eval_tensors(bn)
        return ops.batch_norm_act(z, weight, bias, rm, rv, None, training=False, momentum=None, eps=eps,
                                  residual=residual, relu=relu, backend=backend)
    track = bn.training and bn.track_running_stats
    state = (bn.running_mean if track else None, bn.running_var if track else None,
             bn.num_batches_tracked if track else None)
    if is_synchronised_bn_class(type(bn)) and bn.is_synchronised():
        return ops.sync_batch_norm_act(z, bn.weight, bn.bias, *state, momentum=bn.momentum, eps=bn.eps,
                                       process_group=bn.process_group, residual=residual, relu=relu,
                                       batch_mean=batch_mean, batch_var=batch_var, backend=backend)
    return ops.batch_norm_act(z, bn.weight, bn.bias, *state, training=True, momentum=bn.momentum, eps=bn.eps,
                              residual=residual, relu=relu, batch_mean=batch_mean, batch_var=batch_var,
                              backend=backend)


def stats_from_sums(z: torch.Tensor, s: torch.Tensor, ss: torch.Tensor,
                    shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch_mean, batch_var) for bn_act from a conv's per-channel sum `s`
    and sum of squares `ss` of its raw output over N, H, W (z's count per
    channel), when z = raw + shift[c] (a conv bias the sums did not see).
    Formed in fp64 from the fp32 sums (ops.bn_math.moments_from_sums);
    detached: batch_norm_act's backward carries the statistics' gradient."""
    mean, var = ops.bn_math.moments_from_sums(s.detach().double(), ss.detach().double(), z.numel() // z.shape[1])
    if shift is not None:
        mean = mean + shift.detach().double()
    return mean.to(s.dtype), var.to(s.dtype)


def batch_scale_shift(bn: nn.Module, mean: torch.Tensor, var: torch.Tensor, count: int, acc: torch.dtype):
    """(scale, shift) of a batch-statistics bn from the batch mean and biased
    variance over `count` values per channel, differentiable in both and in
    bn's weight and bias (a prologue's); the running statistics are updated
    with PyTorch's rules (bn_finalize)."""
    mean, var = mean.double(), var.double()
    if bn.training and bn.running_mean is not None:
        with torch.no_grad():
            ops.bn_finalize(mean.to(acc), var.to(acc), count, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                            bn.num_batches_tracked, bn.momentum, bn.eps)
    weight = None if bn.weight is None else bn.weight.double()
    bias = None if bn.bias is None else bn.bias.double()
    scale, shift, _ = ops.bn_math.scale_shift(mean, var, weight, bias, bn.eps)
    return scale.to(acc), shift.to(acc)
