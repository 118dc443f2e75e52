"""Fused subclasses of other libraries' module classes, made at run time.

convert() fuses a torchvision ResNet's stem and timm's residual blocks in
place by swapping the module's __class__ for a subclass (a fused mixin in
front of the library's class): the module keeps its children, attributes,
hooks and state_dict keys, and isinstance checks against the library's
class still hold.

Such a class lives in no module, so pickle cannot name it. Its instances
pickle as "the fused subclass of <library class> with <mixin>" instead and
are rebuilt on load (fused_resnet must be importable there; the library's
class and the mixin are pickled by reference as usual). That is what
torch.save(model), copy.deepcopy, DataLoader workers and
torch.multiprocessing's spawn need.

Under torch.jit.script the fused forward (Python dispatch, no TorchScript)
is not compiled: each mixin's forward takes its library class's own forward
when scripting, copied into the subclass as `_library_forward` (or
`_library_forward_impl`), so a scripted converted model runs eager ops.
"""

from __future__ import annotations

import types

from torch import nn

_classes: dict[tuple[type, type], type] = {}


def fused_subclass(mixin: type, base: type) -> type:
    """The class (mixin, base), made once per pair, named and placed as
    `base` is (so reprs and warnings read as the library's)."""
    key = (mixin, base)
    cls = _classes.get(key)
    if cls is None:
        namespace = {
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "_swapped_from": key,
            # The library's own code, compiled instead of the fused path by
            # torch.jit.script (see the module docstring).
            "_library_forward": _renamed(base.forward, "_library_forward"),
        }
        if hasattr(base, "_forward_impl"):
            namespace["_library_forward_impl"] = _renamed(base._forward_impl, "_library_forward_impl")
        cls = type(base.__name__, (mixin, base), namespace)
        _classes[key] = cls
    return cls


def _renamed(fn, name: str):
    """fn under another __name__: TorchScript names a method it compiles on
    demand after its function, and the mixin already defines `forward` /
    `_forward_impl` on the same class."""
    out = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    out.__kwdefaults__, out.__annotations__ = fn.__kwdefaults__, dict(fn.__annotations__)
    out.__qualname__ = fn.__qualname__.rsplit(".", 1)[0] + "." + name
    return out


def swap_class(module: nn.Module, mixin: type) -> None:
    """module.__class__ becomes the fused subclass of its class (in place)."""
    if not isinstance(module, mixin):
        module.__class__ = fused_subclass(mixin, type(module))


def _rebuild(mixin: type, base: type) -> nn.Module:
    cls = fused_subclass(mixin, base)
    return cls.__new__(cls)


class PicklableSwap:
    """Base of the fused mixins: instances of a swapped class pickle through
    _rebuild (see the module docstring)."""

    def __reduce_ex__(self, protocol):
        mixin, base = type(self)._swapped_from
        return _rebuild, (mixin, base), self.__getstate__()
