"""BatchNorm folded into the conv before it, for eval-mode units, cached.

The cache of each BN module is held beside it, in a dictionary weakly keyed
on the module (its entries go when the module goes), never in the module
itself: the module's state, pickles, deep copies and TorchScript see nothing
of it, and a copy folds afresh. Entries are keyed on the identity (data
pointer) and version counter of every tensor the fold reads, so
load_state_dict, optimizer steps and in-place edits under torch.no_grad()
all invalidate them: a train step followed by eval never sees a stale fold.
(Edits through `.data` bypass PyTorch's version counters, as they bypass
autograd's checks too.)
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import nn

from .. import _compat
from ..ops import reference
from .bn_modules import eval_tensors

_MAX_ENTRIES = 4
_lock = threading.Lock()
# BN module -> {key: value}; a module's dict is replaced whole under _lock,
# never mutated, so readers need no lock.
_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def entries(bn: nn.Module) -> dict:
    """The cached folds of a BN module (a read-only view, for tests and
    diagnostics)."""
    return dict(_caches.get(bn) or {})


def _key(tensors, extra) -> tuple:
    parts = []
    for t in tensors:
        parts.append(None if t is None else (t.data_ptr(), _compat.version_counter(t), t.dtype, t.device))
    return tuple(parts) + tuple(extra)


def fold(conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype | None = None):
    """(weight', bias') of conv followed by eval BN, computed in fp32 (fp64
    for fp64) and returned in `dtype` (default: the conv weight's)."""
    rm, rv, g, b, eps = eval_tensors(bn)
    w, bias = reference.fold_bn(conv.weight, rm, rv, g, b, eps, conv.bias)
    dtype = dtype or conv.weight.dtype
    return w.to(dtype), bias.to(dtype)


def fold_keep_bias(conv: nn.Conv2d, bn: nn.Module):
    """fold() with the bias left in fp32 (fp64 for fp64) instead of the conv
    weight's dtype: for a sum of two folded biases (the projection shortcut
    GEMM), rounded once. The weight is the same as fold()'s."""
    acc = reference.stat_dtype(conv.weight.dtype)
    rm, rv, g, b, eps = eval_tensors(bn)
    w, bias = reference.fold_bn(conv.weight.to(acc), rm, rv, g, b, eps, conv.bias)
    return w.to(conv.weight.dtype), bias


def pair_key(conv: nn.Conv2d, bn: nn.Module) -> tuple:
    """The identity and version of every tensor a fold of (conv, bn) reads,
    and eps: pass as cached(..., extra=pair_key(conv2, bn2)) for an entry that
    also depends on a second conv + BN pair."""
    rm, rv, g, b, eps = eval_tensors(bn)
    return _key((conv.weight, conv.bias, rm, rv, g, b), ()) + (float(eps),)


def needs_grad(conv: nn.Conv2d, bn: nn.Module) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in (conv.weight, conv.bias, bn.weight, bn.bias))


def cached(conv: nn.Conv2d, bn: nn.Module, kind: str, make, extra=()):
    """Return make() cached under (kind, extra, versions of every input).

    Not cached while autograd must see the fold (frozen BN being trained
    through), while torch.compile traces (it folds constants itself) or
    while torch.jit.trace records (the fold then belongs in the graph, so
    the traced module follows its own parameters)."""
    if needs_grad(conv, bn) or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return make()
    rm, rv, g, b, _ = eval_tensors(bn)
    key = (kind,) + _key((conv.weight, conv.bias, rm, rv, g, b), extra) + (float(bn.eps),)
    cache = _caches.get(bn)
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            return hit
    value = make()
    with _lock:
        cache = dict(_caches.get(bn) or {})
        # Drop entries of older versions of the same tensors, keep a few
        # shapes/dtypes side by side.
        stale = [k for k in cache if k[0] == kind and k[1:7] != key[1:7]]
        for k in stale:
            del cache[k]
        while len(cache) >= _MAX_ENTRIES:
            cache.pop(next(iter(cache)))
        cache[key] = value
        _caches[bn] = cache
    return value


def clear(model: nn.Module) -> None:
    """Drop every cached fold in model."""
    with _lock:
        for m in model.modules():
            _caches.pop(m, None)
