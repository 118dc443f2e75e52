"""Which kernel runs, decided in one place: this module.

Three questions are answered here and nowhere else:

1. What can run here: availability() (the native extension's kernels per
   device, Triton and its interpreter, the cuDNN frontend graphs, a GPU),
   with the reason for every "no". Importing never fails because a backend
   is missing.
2. Which backend runs a tensor: resolve(choice, device, layer). The choice
   is a module's own (`backend=`), else the global setting (config
   "backend": set_backend() or $FUSED_RESNET_BACKEND). "auto" is `cpu` on
   CPU tensors and, on CUDA tensors, the backend the recorded GPU figures
   show fastest for the unit's layer class (auto_choices/<gpu>.json, written
   from a `make gpu-check` record), else `cuda`. A backend that cannot run on
   the tensor's device hands over to that device's auto choice, except the
   Triton interpreter (TRITON_INTERPRET=1), which exists to run the triton
   backend's kernels on CPU tensors.
3. Which implementation of an operation a backend runs on a device: TABLE,
   (operation, backend, device type) -> implementation. An operation is one
   of the functional ops (fused_resnet.ops) or one of the units the modules
   are built from (UNITS). "native" means the op's C++/CUDA kernel from
   fused_resnet._C where it was built (else the reference); a "module:name"
   string names a Python implementation, imported on first use; a missing
   entry means DEFAULTS[operation] (for the ops: fused_resnet.ops.reference).
   kernel() answers it.

Implementations may still decline work their kernel cannot take (a dtype,
autograd through an inference-only kernel) by running the default path:
each says so in its docstring. Nothing outside this module compares backend
names.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import _compat, config

BACKENDS = ("reference", "cpu", "cuda", "cudnn", "triton")
NATIVE = "native"  # torch.ops.fused_resnet.<op>'s C++/CUDA kernel, where built
OP = "op"  # torch.ops.fused_resnet.<op>, a Python-defined op with kernels registered per device

# ------------------------------------------------------------------ the table

# The BatchNorm and epilogue ops with C++ (csrc/cpu) and CUDA (csrc/cuda) kernels.
NATIVE_OPS = ("add_relu", "relu_mask", "bn_stats", "bn_finalize", "bn_apply", "bn_backward", "bn_backward_reduce",
              "bn_backward_elemt")
# The Triton convolutions with fused epilogues / prologues.
CONV_OPS = ("conv2d_bn_act", "conv2d_bias_act_shortcut", "conv2d_prologue_bn_act", "conv2d_dgrad_prologue")
# What the modules are built from (fused_resnet/nn/paths/; backends/units.py
# says what each takes and returns).
UNITS = ("eval_unit", "train_conv", "shortcut_unit", "prologue_block", "prologue_conv", "inference_pool",
         "begin_block")

_GPU_BACKENDS = ("cuda", "cudnn", "triton")
_B = "fused_resnet.backends."

TABLE: dict[tuple[str, str, str], str] = {
    **{(op, "cpu", "cpu"): NATIVE for op in NATIVE_OPS + ("max_pool2d",)},
    # The Triton interpreter's runs on CPU tensors use the C++ kernels around the Triton conv.
    **{(op, "triton", "cpu"): NATIVE for op in NATIVE_OPS + ("max_pool2d",)},
    **{(op, b, "cuda"): NATIVE for op in NATIVE_OPS for b in _GPU_BACKENDS},
    # The Triton conv is these ops' only fused kernel: every GPU backend runs it
    # (and the interpreter on CPU tensors); where it cannot run, its kernel
    # computes the op with aten (backends/triton/conv_ops.py).
    **{(op, "triton", "cpu"): OP for op in CONV_OPS},
    **{(op, b, "cuda"): OP for op in CONV_OPS for b in _GPU_BACKENDS},
    ("eval_unit", "cpu", "cpu"): f"{_B}cpu.onednn:eval_unit",
    ("eval_unit", "cudnn", "cuda"): f"{_B}cudnn.units:eval_unit",
    ("eval_unit", "triton", "cuda"): f"{_B}triton.units:eval_unit",
    ("eval_unit", "triton", "cpu"): f"{_B}triton.units:eval_unit",
    ("train_conv", "cudnn", "cuda"): f"{_B}cudnn.units:train_conv",
    ("train_conv", "triton", "cuda"): f"{_B}triton.units:train_conv",
    ("train_conv", "triton", "cpu"): f"{_B}triton.units:train_conv",
    ("shortcut_unit", "triton", "cuda"): f"{_B}triton.units:shortcut_unit",
    ("shortcut_unit", "triton", "cpu"): f"{_B}triton.units:shortcut_unit",
    ("prologue_block", "triton", "cuda"): f"{_B}triton.units:prologue_block",
    ("prologue_block", "triton", "cpu"): f"{_B}triton.units:prologue_block",
    ("prologue_conv", "triton", "cuda"): f"{_B}triton.units:prologue_conv",
    ("prologue_conv", "triton", "cpu"): f"{_B}triton.units:prologue_conv",
    ("inference_pool", "cpu", "cpu"): f"{_B}cpu.pool:inference_pool",
    ("begin_block", "cpu", "cpu"): f"{_B}cpu.finite_bounds:begin_block",
}

# What runs where TABLE has no entry: aten's convolution with the fused
# epilogue ops (backends/units.py), the reference for the functional ops.
DEFAULTS: dict[str, str] = {
    **{op: f"fused_resnet.ops.reference:{op}" for op in NATIVE_OPS + ("max_pool2d",) + CONV_OPS},
    "eval_unit": f"{_B}units:eval_unit",
    "train_conv": f"{_B}units:train_conv",
    "shortcut_unit": f"{_B}units:no_shortcut_unit",
    "prologue_block": f"{_B}units:no_prologue_block",
    "prologue_conv": f"{_B}units:no_prologue_conv",
    "inference_pool": f"{_B}units:inference_pool",
    "begin_block": f"{_B}units:begin_block",
}


def _import(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


_loaded: dict[str, Callable] = {}


def _device_key(device_type: str) -> str:
    return "CUDA" if device_type == "cuda" else "CPU"


@_compat.assume_constant_result
def _target(op: str, backend: str, device_type: str) -> str:
    """The implementation TABLE names for (op, backend, device type), a native
    kernel only where it was built; loaded into _loaded on the way (so a
    torch.compile trace finds it there)."""
    target = TABLE.get((op, backend, device_type))
    if target == NATIVE:
        target = f"native:{op}" if has_kernel(op, _device_key(device_type)) else None
    elif target == OP:
        target = f"native:{op}"
    target = target or DEFAULTS[op]
    if target not in _loaded:
        _loaded[target] = getattr(torch.ops.fused_resnet, op) if target.startswith("native:") else _import(target)
    return target


def kernel(op: str, backend: str, device_type: str) -> Callable:
    """The implementation of `op` that `backend` runs on `device_type` (see
    the module docstring); backend is a resolved name (resolve())."""
    return _loaded[_target(op, backend, device_type)]


def runs_native(op: str, backend: str, device_type: str) -> bool:
    """Whether kernel() is torch.ops.fused_resnet.<op> (not the reference)."""
    return _target(op, backend, device_type).startswith("native:")


def kernel_for(op: str, t: torch.Tensor, choice: str | None = None) -> Callable:
    """kernel() for a tensor: the backend resolved from `choice` (None: the
    global one; an unknown name raises BackendError) for its device."""
    if choice is not None and choice.strip().lower() not in BACKENDS + ("auto",):
        validate(choice)  # raises, naming the choices
    return kernel(op, resolve(None if choice is None else choice.strip().lower(), t.device), t.device.type)


# ------------------------------------------------------------ what runs here


@dataclass(frozen=True)
class Availability:
    name: str
    available: bool
    reason: str  # why not, or what it runs on


class BackendError(ValueError):
    pass


_native_error: str | None = None
try:  # loading the extension registers torch.ops.fused_resnet.*
    from . import _C  # noqa: F401
except Exception as exc:  # noqa: BLE001 - any load failure means "not built here"
    _native_error = f"fused_resnet._C did not load ({type(exc).__name__}: {exc}); run `make build`"


def native_loaded() -> bool:
    return _native_error is None


def native_error() -> str | None:
    """Why fused_resnet._C did not load, or None."""
    return _native_error


# Kernels register once, when _C loads, and never go away: the dispatcher is
# asked once per (op, key) (the query costs ~10 us).
_kernel_answers: dict[tuple[str, str], bool] = {}


@_compat.assume_constant_result
def has_kernel(op: str, dispatch_key: str) -> bool:
    """True if torch.ops.fused_resnet.<op> has a kernel for the dispatch key."""
    hit = _kernel_answers.get((op, dispatch_key))
    if hit is None:
        hit = _native_error is None and _compat.dispatcher_has_kernel(f"fused_resnet::{op}", dispatch_key)
        _kernel_answers[(op, dispatch_key)] = hit
    return hit


def triton_interpreter_on() -> bool:
    """TRITON_INTERPRET=1: Triton's own variable, which it reads when a kernel
    is decorated (fused_resnet.backends.triton imports its kernels lazily)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def cudnn_graphs_built() -> bool:
    """fused_resnet._C holds the cuDNN graphs (the frontend headers were found
    at build time); whether a GPU is visible is a separate matter."""
    return has_kernel("cudnn_conv_bias_act", "CUDA")


def _compute_availability() -> dict[str, Availability]:
    gpu = torch.cuda.is_available()
    out = {"reference": Availability("reference", True, "plain PyTorch ops, every device")}
    if has_kernel("add_relu", "CPU"):
        out["cpu"] = Availability("cpu", True, "C++ kernels built")
    else:
        out["cpu"] = Availability("cpu", False, _native_error or "fused_resnet._C has no CPU kernels")
    if not has_kernel("add_relu", "CUDA"):
        why = _native_error or "fused_resnet._C was built without CUDA (FUSED_RESNET_SKIP_CUDA, no nvcc, or a CPU torch)"
        out["cuda"] = Availability("cuda", False, why)
    elif not gpu:
        out["cuda"] = Availability("cuda", False, "CUDA kernels are built but no GPU is visible")
    else:
        out["cuda"] = Availability("cuda", True, f"CUDA kernels on {torch.cuda.get_device_name()}")
    if not cudnn_graphs_built():
        out["cudnn"] = Availability("cudnn", False,
                                    "the cuDNN-frontend graphs were not built (frontend headers missing at build time)")
    elif not gpu:
        out["cudnn"] = Availability("cudnn", False, "cuDNN graphs are built but no GPU is visible")
    else:
        out["cudnn"] = Availability("cudnn", True, "cuDNN frontend graphs")
    terr = _triton_import_error()
    if terr is not None:
        out["triton"] = Availability("triton", False, terr)
        out["triton-interpreter"] = Availability("triton-interpreter", False, terr)
    else:
        if gpu:
            out["triton"] = Availability("triton", True, "Triton kernels on the GPU")
        elif triton_interpreter_on():
            out["triton"] = Availability("triton", True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1)")
        else:
            out["triton"] = Availability("triton", False, "no GPU (set TRITON_INTERPRET=1 to run it on CPU)")
        out["triton-interpreter"] = Availability(
            "triton-interpreter", True,
            "on (TRITON_INTERPRET=1)" if triton_interpreter_on() else "available: set TRITON_INTERPRET=1 before import")
    return out


@functools.lru_cache(maxsize=8)
def _cached_availability(interp: bool, n_gpus: int) -> dict[str, Availability]:
    return _compute_availability()


def availability() -> dict[str, Availability]:
    """Every backend with whether it can run on this machine and why (not)."""
    return _cached_availability(triton_interpreter_on(), torch.cuda.device_count() if torch.cuda.is_available() else 0)


def available_backends() -> list[str]:
    av = availability()
    return [n for n in BACKENDS if av[n].available]


def validate(name: str) -> str:
    """Normalise a backend name; unknown or unavailable names raise BackendError."""
    if not isinstance(name, str):
        raise BackendError(f"backend must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key == "auto":
        return key
    if key not in BACKENDS:
        raise BackendError(
            f"unknown backend {name!r}; expected 'auto' or one of {', '.join(BACKENDS)} "
            f"(available here: {', '.join(['auto'] + available_backends())})")
    av = availability()[key]
    if not av.available:
        raise BackendError(f"backend {key!r} is not available here: {av.reason}. "
                           f"Available: {', '.join(['auto'] + available_backends())}")
    return key


def set_backend(name: str) -> None:
    """Choose the backend for every fused module that has no `backend=` of its own."""
    config.set_value("backend", validate(name), "set_backend()")


def get_backend() -> str:
    """The global choice (config "backend"): set_backend(), else
    $FUSED_RESNET_BACKEND at import, else 'auto'. A name from the environment
    that cannot run here raises BackendError now, naming the variable."""
    name = config.get("backend")
    if config.source("backend").startswith("$"):
        try:
            return validate(name)
        except BackendError as exc:
            raise BackendError(f"$FUSED_RESNET_BACKEND: {exc}") from None
    return name


# ---------------------------------------------------------------- auto on GPUs

AUTO_CHOICES_DIR = Path(__file__).with_name("auto_choices")
ROLES = ("stem", "inner", "last", "downsample")
MODES = ("inference", "train")


def layer_class(mode: str, role: str, kernel_size, stride) -> str:
    """The key of a layer class, as recorded by `make gpu-check`:
    <mode>/<role>/<kh>x<kw>/s<stride>, e.g. train/inner/3x3/s1. role: stem,
    inner (a block's first convs), last (a block's last conv, the one with
    the residual), downsample (the projection shortcut's conv)."""
    if mode not in MODES:
        raise ValueError(f"layer_class: `mode` must be one of {', '.join(MODES)}, got {mode!r}")
    if role not in ROLES:
        raise ValueError(f"layer_class: `role` must be one of {', '.join(ROLES)}, got {role!r}")
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
    return f"{mode}/{role}/{kh}x{kw}/s{sh}" + ("" if sh == sw else f"x{sw}")


def auto_choice_path(device_name: str) -> Path:
    """Where auto's recorded choice for this GPU lives (auto_choices/<slug of
    the device name>.json)."""
    return AUTO_CHOICES_DIR / (re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower() + ".json")


@functools.lru_cache(maxsize=8)
def recorded_auto_choice(device_name: str) -> dict[str, str]:
    """{layer class: backend} recorded for this GPU (auto_choices/<slug>.json,
    the `classes` of a gpu-check record's auto_choice.json), {} without one."""
    path = auto_choice_path(device_name)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v["backend"] for k, v in data.get("classes", {}).items() if v.get("backend") in _GPU_BACKENDS}


@_compat.assume_constant_result
def _auto_on_cuda(layer: str | None, device_index: int) -> str:
    av = availability()
    if layer is not None and torch.cuda.is_available():
        recorded = recorded_auto_choice(torch.cuda.get_device_name(device_index)).get(layer)
        if recorded is not None and av[recorded].available:
            return recorded
    for cand in ("cuda", "triton"):
        if av[cand].available:
            return cand
    return "reference"


# --------------------------------------------------------------------- resolve

# resolve()'s answers in eager mode, keyed on everything they depend on that
# can change while a process runs (recomputing cost ~13 us per call).
_resolved: dict[tuple, str] = {}


def resolve(choice: str | None, device: torch.device, layer: str | None = None) -> str:
    """The backend that runs a tensor on `device`, given a module's choice
    (None = the global one) and, for `auto` on CUDA, the unit's layer class
    (layer_class(); None = the default). A compiled model keeps the backend
    it was traced with (call fused_resnet._compat.reset_compiled() after
    set_backend)."""
    if torch.compiler.is_compiling():
        return _resolve_on(choice if choice is not None else get_backend(), device.type, layer, device.index or 0)
    key = (choice, config.get("backend"), device.type, device.index, layer, os.environ.get("TRITON_INTERPRET"))
    hit = _resolved.get(key)
    if hit is None:
        hit = _resolve_on(choice if choice is not None else get_backend(), device.type, layer, device.index or 0)
        _resolved[key] = hit
    return hit


def runs_eager(choice: str | None, device: torch.device) -> bool:
    """Whether `choice` resolves to the reference backend on `device`: the
    modules then run their own eager forward, bit for bit torchvision's."""
    return resolve(choice, device) == "reference"


@_compat.assume_constant_result
def _resolve_on(choice: str, device_type: str, layer: str | None, device_index: int) -> str:
    av = availability()
    if device_type == "cuda":
        if choice == "auto":
            return _auto_on_cuda(layer, device_index)
        if choice in _GPU_BACKENDS + ("reference",) and (choice == "reference" or av[choice].available):
            return choice
        return _auto_on_cuda(layer, device_index)
    if choice == "reference":
        return "reference"
    if choice == "triton" and device_type == "cpu" and triton_interpreter_on() and av["triton"].available:
        return "triton"
    return "cpu" if av["cpu"].available else "reference"
