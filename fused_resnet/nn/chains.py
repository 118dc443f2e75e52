"""The calls of fused chains, for graphs fuse() rewrites and for the
composable modules: relu?(bn(conv(x)) [+ residual]) and relu?(bn(z) [+
residual]) on the resolved backend, each with eager's semantics wherever
the fused path cannot take its operands (a residual that broadcasts, a
module swapped for another kind after fusing)."""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from .. import _compat, dispatch, ops
from ..backends import bn_modules
from . import paths

__all__ = ["run_unit", "run_bn_act", "run_add_relu", "timm_bn_act"]


def _choice(owner_backend: str | None, x: torch.Tensor) -> str:
    return dispatch.resolve(owner_backend, x.device)


def _residual_fits(residual, shape: torch.Size) -> bool:
    return isinstance(residual, torch.Tensor) and residual.shape == shape


def timm_bn_act(m: nn.Module) -> bool | None:
    """timm's BatchNormAct2d (a BatchNorm2d with its activation inside): True
    (ends in a ReLU), False (no activation), None (anything else)."""
    if type(m).__name__ != "BatchNormAct2d" or not type(m).__module__.startswith("timm."):
        return None
    if not isinstance(m, nn.BatchNorm2d) or type(getattr(m, "drop", None)) is not nn.Identity:
        return None
    act = getattr(m, "act", None)
    if type(act) is nn.ReLU and not (act._forward_hooks or act._forward_pre_hooks):
        return True
    return False if type(act) is nn.Identity else None


def fusable_bn(bn: nn.Module) -> bool:
    """A BatchNorm the chains fuse: the units' kinds and timm's BatchNormAct2d."""
    return bn_modules.bn_supported(bn) or timm_bn_act(bn) is not None


def run_unit(conv: nn.Module, bn: nn.Module, x: torch.Tensor, residual, relu: bool, prologue: nn.Module | None,
             backend: str | None, residual_owned: bool = False) -> torch.Tensor:
    """relu?(bn(conv(prologue(x))) [+ residual]), prologue = BN + ReLU.
    residual_owned: the residual is a fresh tensor nobody reads after this
    call, so an inference unit may write its result over it."""
    if dispatch.runs_eager(backend, x.device) or not (fusable_bn(bn) and bn_modules.is_plain_conv(conv)):
        if prologue is not None:
            x = run_bn_act(prologue, x, None, True, backend)
        return _eager_tail(bn(conv(x)), residual, relu)
    chosen = _choice(backend, x)
    if prologue is not None:
        fused = dispatch.kernel("prologue_conv", chosen, x.device.type)(prologue, conv, x, chosen)
        if fused is not None:
            z, s, ss = fused
            stats = bn_modules.stats_from_sums(z, s, ss) if bn_modules.uses_batch_stats(bn) else (None, None)
            return _bn_tail(bn, z, residual, relu, chosen, *stats)
        x = run_bn_act(prologue, x, None, True, backend)
    if residual is not None and not _residual_fits(residual, _conv_out_shape(conv, x)):
        return _eager_tail(paths.units.unit(conv, bn, x, None, False, chosen), residual, relu)
    # A global forward hook may hold a module's output: the residual then
    # has a reader the graph does not show.
    owned = residual_owned and not _compat.global_forward_hooks_registered()
    return paths.units.unit(conv, bn, x, residual, relu, chosen, residual_owned=owned)


def _conv_out_shape(conv: nn.Conv2d, x: torch.Tensor) -> torch.Size:
    oh, ow = ops.conv_args.out_hw(x.shape, conv.weight.shape, conv.stride, conv.padding, conv.dilation)
    return torch.Size((x.shape[0], conv.out_channels, oh, ow))


def _bn_tail(bn, z, residual, relu, chosen, batch_mean=None, batch_var=None):
    if residual is not None and not _residual_fits(residual, z.shape):
        return _eager_tail(bn_modules.bn_act(bn, z, None, False, chosen, batch_mean, batch_var), residual, relu)
    return bn_modules.bn_act(bn, z, residual, relu, chosen, batch_mean, batch_var)


def _eager_tail(y, residual, relu):
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def run_bn_act(bn: nn.Module, z: torch.Tensor, residual, relu: bool, backend: str | None) -> torch.Tensor:
    """relu?(bn(z) [+ residual]) in one pass."""
    if (not isinstance(z, torch.Tensor) or z.dim() != 4 or dispatch.runs_eager(backend, z.device)
            or not fusable_bn(bn)):
        return _eager_tail(bn(z), residual, relu)
    return _bn_tail(bn, z, residual, relu, _choice(backend, z))


def run_add_relu(a, b, backend: str | None):
    """relu(a + b), one pass where both are tensors of one shape and dtype."""
    if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
            and a.device == b.device and a.is_floating_point()):
        return ops.add_relu(a, b, backend=_choice(backend, a))
    return torch.relu(a + b)


torch.fx.wrap("run_unit")
torch.fx.wrap("run_bn_act")
torch.fx.wrap("run_add_relu")
