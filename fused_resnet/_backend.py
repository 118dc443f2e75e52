"""What can run here, and which backend runs a given tensor.

Backends (see ../DESIGN.md):
  reference           plain eager PyTorch ops: the ground truth, always available
  cpu                 C++ kernels of fused_resnet._C + oneDNN (aten) convolutions
  cuda                cuDNN (aten) convolutions + CUDA kernels of fused_resnet._C
  cudnn               whole conv + BN + add + ReLU graphs through the cuDNN frontend
  triton              Triton implicit-GEMM convolutions with fused epilogues
  triton-interpreter  the triton backend's kernels run by Triton's interpreter on
                      CPU tensors (TRITON_INTERPRET=1); for tests, not speed

`auto` (the default) picks per device at run time. Importing this module never
fails because a backend is missing: it records why instead.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from . import _compat

BACKENDS = ("reference", "cpu", "cuda", "cudnn", "triton")
ENV_VAR = "FUSED_RESNET_BACKEND"


@dataclass(frozen=True)
class Availability:
    name: str
    available: bool
    reason: str  # why not, or what it runs on


_native_error: str | None = None
try:  # loading the extension registers torch.ops.fused_resnet.*
    from . import _C  # noqa: F401
except Exception as exc:  # noqa: BLE001 - any load failure means "not built here"
    _native_error = f"fused_resnet._C did not load ({type(exc).__name__}: {exc}); run `make build`"


def native_loaded() -> bool:
    return _native_error is None


# Kernels register once, when _C loads, and never go away: the dispatcher is
# asked once per (op, key) (the query costs ~10 us, and every forward asks).
_kernel_answers: dict[tuple[str, str], bool] = {}


@_compat.assume_constant_result
def has_kernel(op: str, dispatch_key: str) -> bool:
    """True if torch.ops.fused_resnet.<op> has a kernel for the dispatch key."""
    hit = _kernel_answers.get((op, dispatch_key))
    if hit is None:
        hit = _native_error is None and _query_kernel(op, dispatch_key)
        _kernel_answers[(op, dispatch_key)] = hit
    return hit


def _query_kernel(op: str, dispatch_key: str) -> bool:
    return _compat.dispatcher_has_kernel(f"fused_resnet::{op}", dispatch_key)


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def _cudnn_frontend_reason() -> str | None:
    if not has_kernel("cudnn_conv_bias_act", "CUDA"):
        return "the cuDNN-frontend graphs were not built (frontend headers missing at build time)"
    return None


def _compute_availability() -> dict[str, Availability]:
    gpu = torch.cuda.is_available()
    out: dict[str, Availability] = {
        "reference": Availability("reference", True, "plain PyTorch ops, every device"),
    }
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

    cudnn_reason = _cudnn_frontend_reason()
    if cudnn_reason is None and not gpu:
        cudnn_reason = "cuDNN graphs are built but no GPU is visible"
    out["cudnn"] = Availability("cudnn", cudnn_reason is None, cudnn_reason or "cuDNN frontend graphs")

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
            "on (TRITON_INTERPRET=1)" if triton_interpreter_on() else "available: set TRITON_INTERPRET=1 before import",
        )
    return out


def available_backends() -> list[str]:
    av = availability()
    return [n for n in BACKENDS if av[n].available]


class BackendError(ValueError):
    pass


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
            f"(available here: {', '.join(['auto'] + available_backends())})"
        )
    av = availability()[key]
    if not av.available:
        raise BackendError(
            f"backend {key!r} is not available here: {av.reason}. "
            f"Available: {', '.join(['auto'] + available_backends())}"
        )
    return key


_global_backend: str | None = None


def set_backend(name: str) -> None:
    """Choose the backend for every fused module that has no `backend=` of its own."""
    global _global_backend
    _global_backend = validate(name)


def get_backend() -> str:
    """The global choice: set_backend(), else $FUSED_RESNET_BACKEND, else 'auto'."""
    if _global_backend is not None:
        return _global_backend
    return _env_backend()


# The answers below depend only on strings, the build and the environment, so
# torch.compile may fold them to constants (its tracer cannot call into the
# dispatcher's registry or lru_caches): the blocks then trace with no graph
# break. A compiled model keeps the backend it was traced with.
@_compat.assume_constant_result
def _env_backend() -> str:
    env = os.environ.get(ENV_VAR)
    return validate(env) if env else "auto"


# resolve()'s answers in eager mode, keyed on everything they depend on that
# can change while a process runs: the module's and the global choice, the
# device type and the two environment variables. Visible GPUs and the build
# do not change after the first answer. (Recomputing availability cost about
# 13 us per call, twice per BatchNorm forward + backward.)
_resolved: dict[tuple, str] = {}


def resolve(name: str | None, device: torch.device) -> str:
    """The backend that runs a tensor on `device`, given a module's choice
    (None = the global one). A backend that cannot run on the device type
    hands over to that device's `auto` pick (a CPU tensor reaching the triton
    backend runs on the cpu backend), except the triton interpreter, which
    exists precisely to run Triton kernels on CPU tensors."""
    if torch.compiler.is_compiling():
        # Traced: the constant-folded path below, no dict the tracer would guard on.
        choice = name if name is not None else get_backend()
        return _resolve_on(choice, device.type)
    env = os.environ
    key = (name, _global_backend, device.type, env.get(ENV_VAR), env.get("TRITON_INTERPRET"))
    hit = _resolved.get(key)
    if hit is None:
        choice = name if name is not None else get_backend()
        hit = _resolve_on(choice, device.type)
        _resolved[key] = hit
    return hit


@_compat.assume_constant_result
def _resolve_on(choice: str, device_type: str) -> str:
    av = availability()
    if device_type == "cuda":
        if choice in ("cuda", "cudnn", "triton", "reference") and (choice == "reference" or av[choice].available):
            return choice
        for cand in ("cuda", "triton"):
            if av[cand].available:
                return cand
        return "reference"
    # CPU (and anything else): C++ kernels if built.
    if choice == "reference":
        return "reference"
    if choice == "triton" and device_type == "cpu" and triton_interpreter_on() and av["triton"].available:
        return "triton"
    return "cpu" if av["cpu"].available else "reference"


# resolve() runs on every forward; the answers change only with the
# environment (TRITON_INTERPRET) or the visible GPUs, so cache on those.
@functools.lru_cache(maxsize=8)
def _cached_availability(interp: bool, n_gpus: int) -> dict[str, Availability]:
    return _compute_availability()


def availability() -> dict[str, Availability]:
    """Every backend with whether it can run on this machine and why (not)."""
    return _cached_availability(triton_interpreter_on(), torch.cuda.device_count() if torch.cuda.is_available() else 0)
