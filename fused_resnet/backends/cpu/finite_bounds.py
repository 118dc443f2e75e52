"""Upper bounds on |value| of inference activations, for oneDNN's fused ReLU.

oneDNN's ReLU post-op maps NaN to 0 where eager's ReLU keeps NaN. The
post-op is exact wherever the pre-activation is not NaN, and a convolution
of finite values cannot produce NaN (or Inf) unless its sums overflow. So a
CPU unit fuses its ReLU only when its input (and residual) is finite and
bounded by B with B * |W|_1 + |b| (+ the residual's bound) < NO_OVERFLOW,
|W|_1 the largest per-output-channel L1 norm of the folded weight;
otherwise it runs the convolution bare and torch.relu after it, eager's
semantics (block_paths._mkldnn_unit).

A bound comes from a measurement, sqrt(sum x^2) >= max|x| in one BLAS pass
(an Inf or NaN makes it infinite), or from the unit that wrote the tensor,
analytically (its pre-activation bound). The bounds of recent tensors are
remembered per thread, keyed on the tensor's identity and version counter
(an in-place write invalidates them), through weak references (a bound
never keeps a tensor alive), so a chain of blocks measures its input once
and then only when the analytic bound grows too loose to prove anything: a
few measurements per ResNet-50 forward. Inference tensors (inference_mode)
have no version counter, so their bounds hold only inside the block that
recorded them (new_scope()), where no other code can write them: there each
block measures its input.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict

import torch

from ... import _compat

# Far under float32's 3.4e38: the rounding of a sum of K terms can exceed
# its exact bound by a factor (1 + K * 2^-24), never by 8.
NO_OVERFLOW = 2.0 ** 125
# Analytic bounds grow by |W|_1 per conv (loose: ~1e3 to 1e6 per block); a
# unit whose pre-activation bound reaches NO_OVERFLOW from remembered bounds
# measures its operands afresh.
_REMEMBERED = 32  # tensors per thread; a forward needs a handful at a time
_state = threading.local()


def _known() -> OrderedDict:
    known = getattr(_state, "known", None)
    if known is None:
        known = _state.known = OrderedDict()
        _state.scope = 0
    return known


def _version(t: torch.Tensor):
    """t's version counter, or this thread's scope for an inference tensor
    (which has none): its bounds then expire with the scope."""
    if t.is_inference():
        _known()
        return ("scope", _state.scope)
    return _compat.version_counter(t)


def new_scope() -> None:
    """A block starts: bounds of inference tensors recorded before it expire
    (code outside our blocks may have written them in place)."""
    _known()
    _state.scope += 1


def begin_block(backend: str) -> None:
    """The cpu backend's begin_block unit (dispatch.UNITS)."""
    new_scope()


def measure(t: torch.Tensor) -> float:
    """sqrt(sum t^2) >= max|t| (remembered for t); inf where t holds NaN or
    Inf, or where the sum overflows (a false alarm only sends a unit down
    the exact path)."""
    flat = t.permute(0, 2, 3, 1) if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) else t
    flat = flat.reshape(-1)
    s = float(torch.dot(flat, flat))
    bound = math.sqrt(s) if math.isfinite(s) else math.inf
    record(t, bound)
    return bound


def of(t: torch.Tensor) -> float:
    """The remembered bound of t, else a measurement."""
    hit = _known().get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == _version(t):
        return hit[2]
    return measure(t)


def record(t: torch.Tensor, bound: float) -> None:
    """Remember that every |value| of t (as it is now) is at most bound."""
    known = _known()
    known[id(t)] = (weakref.ref(t), _version(t), bound)
    known.move_to_end(id(t))
    while len(known) > _REMEMBERED:
        known.popitem(last=False)


def forget() -> None:
    """Drop this thread's remembered bounds."""
    _known().clear()


def carry(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst's values are some of src's (a max pool): src's remembered bound, if
    any, holds for dst too."""
    hit = _known().get(id(src))
    if hit is not None and hit[0]() is src and hit[1] == _version(src):
        record(dst, hit[2])


def weight_bounds(w: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(largest per-output-channel L1 norm of w, largest |b|), in fp64; inf
    where either holds a NaN or an Inf (a NaN running_var, say)."""
    wn = float(w.detach().double().abs().sum(dim=tuple(range(1, w.dim()))).max()) if w.numel() else 0.0
    bn = float(b.detach().double().abs().max()) if b.numel() else 0.0
    return (wn if math.isfinite(wn) else math.inf), (bn if math.isfinite(bn) else math.inf)


def pre_activation(x: torch.Tensor, residual: torch.Tensor | None, w_norm: float, b_max: float) -> float:
    """A bound on |conv(x) + b [+ residual]| from the operands' bounds,
    measured afresh when the remembered ones are too loose to prove that
    nothing overflows."""

    def bound(get) -> float:
        return get(x) * w_norm + b_max + (get(residual) if residual is not None else 0.0)

    pre = bound(of)
    return pre if pre < NO_OVERFLOW else bound(measure)
