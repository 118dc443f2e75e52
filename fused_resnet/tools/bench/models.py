"""The models `fused-resnet bench | verify | layers | roofline` take, by spec:

  resnet50                  a builder of fused_resnet.MODEL_BUILDERS: torchvision's
                            model as eager, fused_resnet's own builder as fused
  torchvision:NAME          torchvision.models.NAME (dots reach subpackages:
                            torchvision:segmentation.fcn_resnet50), fused by fuse()
  timm:NAME                 timm.create_model(NAME), fused by fuse()
  package.module:function   any callable returning an nn.Module, fused by fuse();
  path/to/file.py:function  a file outside any package works too

The model must map an image batch (N, 3, H, W) to logits (N, num_classes):
the benchmarks' training step takes a cross-entropy loss of it. A callable
that accepts `num_classes` gets it.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

from torch import nn


class ModelSpecError(ValueError):
    """A --model that names nothing buildable (the message says what was expected)."""


def is_builtin(spec: str) -> bool:
    """Whether fused_resnet builds this model itself (the torchvision-compatible
    builders), rather than fuse() rewriting another library's model."""
    from ...nn import MODEL_BUILDERS

    return spec in MODEL_BUILDERS


def _call(fn: Callable[..., nn.Module], num_classes: int, what: str) -> nn.Module:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    takes = "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    model = fn(num_classes=num_classes) if takes else fn()
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"--model {what}: returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def _from_file(path: str, name: str, spec: str) -> Callable:
    file = Path(path).resolve()
    if not file.is_file():
        raise ModelSpecError(f"--model {spec}: no such file {path!r}")
    module_name = f"_fused_resnet_model_{file.stem}"
    loader_spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up
    loader_spec.loader.exec_module(module)
    return _attr(module, name, spec)


def _attr(obj, dotted: str, spec: str):
    for part in dotted.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"--model {spec}: {getattr(obj, '__name__', obj)!s} has no {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"--model {spec}: {dotted!r} is not callable")
    return obj


def eager_builder(spec: str) -> Callable[[int], nn.Module]:
    """num_classes -> the eager model `spec` names (see the module docstring).
    Raises ModelSpecError for a spec that names nothing buildable."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError("--model: expected a name such as resnet50, timm:resnet50d, torchvision:NAME or "
                             "module:function")
    spec = spec.strip()
    if is_builtin(spec):
        import torchvision

        return lambda num_classes: getattr(torchvision.models, spec)(num_classes=num_classes)
    lib, sep, name = spec.partition(":")
    if not sep or not name:
        from ...nn import MODEL_BUILDERS

        raise ModelSpecError(f"--model {spec!r}: expected one of {', '.join(MODEL_BUILDERS)}, or torchvision:NAME, "
                             "timm:NAME, package.module:function, path/to/file.py:function")
    if lib == "torchvision":
        import torchvision.models

        fn = _attr(torchvision.models, name, spec)
        return lambda num_classes: _call(fn, num_classes, spec)
    if lib == "timm":
        try:
            import timm
        except ImportError:
            raise ModelSpecError(f"--model {spec}: timm is not installed (pip install timm)") from None
        if name not in timm.list_models():
            raise ModelSpecError(f"--model {spec}: timm has no model {name!r}")
        return lambda num_classes: timm.create_model(name, pretrained=False, num_classes=num_classes)
    if lib.endswith(".py"):
        fn = _from_file(lib, name, spec)
    else:
        try:
            module = importlib.import_module(lib)
        except ImportError as exc:
            raise ModelSpecError(f"--model {spec}: cannot import {lib!r} ({exc})") from None
        fn = _attr(module, name, spec)
    return lambda num_classes: _call(fn, num_classes, spec)


def fused_model(spec: str, state_dict: dict, backend: str | None, num_classes: int) -> nn.Module:
    """The fused model of `spec` holding `state_dict`: fused_resnet's own
    builder for a builtin name (no eager model built), else fuse() of the
    eager model."""
    import fused_resnet

    if is_builtin(spec):
        from ...nn import MODEL_BUILDERS

        model = MODEL_BUILDERS[spec](num_classes=num_classes)
        model.load_state_dict(state_dict)
        model.set_backend(backend)
        return model
    model = eager_builder(spec)(num_classes)
    model.load_state_dict(state_dict)
    return fused_resnet.fuse(model, backend=backend)


def fused_from(spec: str, eager: nn.Module, backend: str | None, num_classes: int) -> nn.Module:
    """The fused counterpart of `eager` (same weights, `eager` untouched):
    fused_resnet's own builder for a builtin name, else fuse() on a copy."""
    import fused_resnet

    if is_builtin(spec):
        return fused_model(spec, eager.state_dict(), backend, num_classes)
    return fused_resnet.fuse(copy.deepcopy(eager), backend=backend)


def num_classes_of(model: nn.Module, default: int = 1000) -> int:
    """The width of the model's last Linear layer (its logits), else `default`."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last.out_features if last is not None else default
