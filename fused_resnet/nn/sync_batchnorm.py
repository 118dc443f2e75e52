"""Synchronised BatchNorm for multi-process training of fused models.

`convert_sync_batchnorm(model)` is nn.SyncBatchNorm.convert_sync_batchnorm
for fused models: every nn.BatchNorm2d becomes a SyncBatchNorm2d that shares
the original parameters and buffers. Inside fused blocks (and the stem) the
unit conv -> BN [+ residual] [-> ReLU] keeps its fused apply and backward
and only the statistics and the gradient sums cross processes
(fused_resnet.ops.sync_batch_norm_act); a SyncBatchNorm2d used on its own
runs the same op without the add and ReLU. In eval mode, or with one
process, it is exactly nn.BatchNorm2d.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import sync_batch_norm_act
from ..ops.sync_batch_norm_act import world_size


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics span every process of
    `process_group` (default: the world), with nn.SyncBatchNorm's semantics:
    mean and biased variance over the concatenated batch (uneven batch sizes
    included), running_var with the unbiased variance of that batch,
    parameter gradients local to each process (DDP averages them)."""

    # The fused units treat it as a BatchNorm2d whose statistics they all-reduce
    # (backends/bn_modules.py), without importing this module.
    fused_resnet_sync_batchnorm = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def is_synchronised(self) -> bool:
        """nn.SyncBatchNorm's rule: synchronise in training mode when the
        group has more than one process."""
        return self.training and world_size(self.process_group) > 1

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.is_synchronised():
            return super().forward(input)
        self._check_input_dim(input)
        track = self.track_running_stats
        return sync_batch_norm_act(
            input, self.weight, self.bias,
            self.running_mean if track else None, self.running_var if track else None,
            self.num_batches_tracked if track else None,
            momentum=self.momentum, eps=self.eps, process_group=self.process_group, relu=False)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every nn.BatchNorm2d in `module` (in place where it is a child;
    returned when `module` itself is one) with a SyncBatchNorm2d synchronised
    over `process_group`, sharing its parameters and buffers (optimizers built
    before the conversion keep working) and keeping its train/eval mode.

    Call it before wrapping the model in DistributedDataParallel, as with
    nn.SyncBatchNorm.convert_sync_batchnorm. Modules that are already
    SyncBatchNorm2d get the new process group.
    """
    if isinstance(module, SyncBatchNorm2d):
        module.process_group = process_group
        return module
    if isinstance(module, nn.BatchNorm2d) and type(module).forward is nn.BatchNorm2d.forward:
        out = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, process_group)
        # Share, not copy: the same Parameter objects and buffer tensors.
        out.weight, out.bias = module.weight, module.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(out, name, getattr(module, name))
        out.train(module.training)
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
        return out
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module
