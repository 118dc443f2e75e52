"""The providers compared by `fused-resnet bench` and `pytest benchmarks/`:
torchvision eager, eager + channels_last, eager + AMP (GPU), torch.compile,
and one provider per fused backend. A provider that cannot run here is kept
in the list as unavailable, with the reason; it is never replaced by another.

Every provider starts from the same state_dict (a torchvision model built
under a fixed seed), so their outputs are comparable.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ... import _compat
from .models import eager_builder, fused_model

FUSED_BACKENDS = ("cpu", "cuda", "cudnn", "triton")
BASE_PROVIDERS = ("eager", "channels_last", "amp", "compile")
# Fused providers that turn optional fusions on (fused_resnet/fusions.py):
# name -> (backend, fusion switches set during its steps, modes it applies to).
FUSION_VARIANTS = {
    "fused-triton+prologue": ("triton", (("prologue", True),), ("train",)),
}
ALL_PROVIDERS = BASE_PROVIDERS + tuple(f"fused-{b}" for b in FUSED_BACKENDS) + tuple(FUSION_VARIANTS)
MODES = ("inference", "train")

# Which device type each fused backend computes on (triton: GPU; on CPU only
# through Triton's interpreter, which exists for tests, not speed).
_BACKEND_DEVICE = {"cpu": "cpu", "cuda": "cuda", "cudnn": "cuda", "triton": "cuda"}


@dataclass(frozen=True)
class Provider:
    name: str
    kind: str  # eager | channels_last | amp | compile | fused
    backend: str | None
    available: bool
    reason: str
    # Fusion switches set while this provider's steps run (the others keep
    # their current settings), and the modes the provider applies to.
    fusions: tuple[tuple[str, bool], ...] = ()
    modes: tuple[str, ...] = MODES

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "backend": self.backend,
                "available": self.available, "reason": self.reason, "fusions": dict(self.fusions),
                "modes": list(self.modes)}


def fused_provider(backend: str, device: torch.device, explicit: bool) -> Provider:
    from ... import dispatch

    name = f"fused-{backend}"
    av = dispatch.availability()[backend]
    if not av.available:
        return Provider(name, "fused", backend, False, av.reason)
    if _BACKEND_DEVICE[backend] != device.type:
        if backend == "triton" and device.type == "cpu" and dispatch.triton_interpreter_on():
            if explicit:
                return Provider(name, "fused", backend, True, "Triton interpreter on CPU (slow by design)")
            return Provider(name, "fused", backend, False,
                            "only the Triton interpreter runs here (for tests, not speed); name it in --providers to run it")
        return Provider(name, "fused", backend, False, f"runs on {_BACKEND_DEVICE[backend]}, not {device.type}")
    return Provider(name, "fused", backend, True, av.reason)


def make_provider(name: str, device: torch.device, dtype: torch.dtype, explicit: bool = False) -> Provider:
    if name == "eager":
        return Provider(name, "eager", None, True, "torchvision model, contiguous (NCHW)")
    if name == "channels_last":
        return Provider(name, "channels_last", None, True, "torchvision model, channels_last")
    if name == "amp":
        if device.type != "cuda":
            return Provider(name, "amp", None, False, "AMP is compared on GPU runs only")
        if dtype not in (torch.bfloat16, torch.float16):
            return Provider(name, "amp", None, False, "AMP needs --dtype bf16 or fp16")
        return Provider(name, "amp", None, True, "fp32 weights, channels_last, autocast")
    if name == "compile":
        return Provider(name, "compile", None, True,
                        "torch.compile, channels_last; inference with freezing"
                        + (" and max-autotune" if device.type == "cuda" else ""))
    if name.startswith("fused-") and name[len("fused-"):] in FUSED_BACKENDS:
        return fused_provider(name[len("fused-"):], device, explicit)
    if name in FUSION_VARIANTS:
        backend, fusions, modes = FUSION_VARIANTS[name]
        base = fused_provider(backend, device, explicit)
        switches = ", ".join(f"{k}={'on' if v else 'off'}" for k, v in fusions)
        return Provider(name, "fused", backend, base.available,
                        base.reason if not base.available else f"{base.reason}; fusions {switches}",
                        fusions=fusions, modes=modes)
    raise ValueError(f"unknown provider {name!r}; expected one of {', '.join(ALL_PROVIDERS)} (or 'fused')")


def parse_provider_names(spec: str | None) -> list[str] | None:
    """'eager,fused' -> ['eager', 'fused-cpu', ...]; None -> None (all)."""
    if spec is None:
        return None
    names: list[str] = []
    for raw in spec.split(","):
        n = raw.strip().lower()
        if not n:
            continue
        expanded = [f"fused-{b}" for b in FUSED_BACKENDS] if n == "fused" else [n]
        for e in expanded:
            if e not in ALL_PROVIDERS:
                raise ValueError(f"unknown provider {raw.strip()!r}; expected one of {', '.join(ALL_PROVIDERS)} "
                                 "or 'fused'")
            if e not in names:
                names.append(e)
    if not names:
        raise ValueError("--providers is empty")
    return names


def select_providers(device, dtype, names: list[str] | None = None) -> list[Provider]:
    device = torch.device(device)
    if names is None:
        return [make_provider(n, device, dtype) for n in ALL_PROVIDERS]
    return [make_provider(n, device, dtype, explicit=True) for n in names]


def fused_backend_params(device) -> list:
    """pytest params (id = backend) for every fused backend, with a skip mark
    and the reason where it cannot run on `device`."""
    import pytest

    device = torch.device(device)
    out = []
    for b in FUSED_BACKENDS:
        p = fused_provider(b, device, explicit=False)
        marks = () if p.available else (pytest.mark.skip(reason=f"fused-{b}: {p.reason}"),)
        out.append(pytest.param(b, id=f"fused-{b}", marks=marks))
    return out


# --- models ---------------------------------------------------------------

def reference_state_dict(model: str, seed: int = 0, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    """The weights every provider starts from: the eager model (models.py)
    built under `seed`."""
    torch.manual_seed(seed)
    return eager_builder(model)(num_classes).state_dict()


def build_model(provider: Provider, model: str, state_dict, device, dtype, channels_last: bool,
                num_classes: int = 1000) -> nn.Module:
    """The provider's model (not yet compiled) with the given weights: the
    eager model for the eager providers; fused_resnet's builder, or fuse() of
    the eager model, for the fused ones."""
    if provider.kind == "fused":
        m = fused_model(model, state_dict, provider.backend, num_classes)
    else:
        m = eager_builder(model)(num_classes)
        m.load_state_dict(state_dict)
    # AMP keeps fp32 weights and lets autocast pick the compute dtype.
    m = m.to(device=device, dtype=torch.float32 if provider.kind == "amp" else dtype)
    if provider.kind != "eager" and channels_last:
        m = m.to(memory_format=torch.channels_last)
    return m


def make_input(batch: int, image_size: int, device, dtype, seed: int = 1, num_classes: int = 1000):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, image_size, image_size, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return x.to(device=device, dtype=dtype), y.to(device)


# --- steps ----------------------------------------------------------------

@dataclass
class Step:
    """One provider in one mode: call() runs one step and returns the logits
    (detached), computed from the weights before the step's update."""

    call: Callable[[], torch.Tensor]
    model: nn.Module


@contextlib.contextmanager
def fusions_of(provider: Provider):
    """The provider's fusion switches on for the duration (restored after)."""
    if not provider.fusions:
        yield
        return
    from ...config import set_fusions

    old = set_fusions(**dict(provider.fusions))
    try:
        yield
    finally:
        set_fusions(**old)


def _autocast(provider: Provider, device: torch.device, dtype: torch.dtype):
    if provider.kind == "amp":
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def make_step(provider: Provider, mode: str, model_name: str, state_dict, x: torch.Tensor, y: torch.Tensor,
              dtype: torch.dtype, channels_last: bool, num_classes: int = 1000, lr: float = 0.01,
              compile_mode: str | None = "auto") -> Step:
    """mode: 'inference' (eval, no_grad) or 'train' (forward + cross-entropy +
    backward + SGD step with momentum). compile_mode: torch.compile's mode for
    inference ('auto': max-autotune on GPU, the default mode on CPU)."""
    device = x.device
    model = build_model(provider, model_name, state_dict, device, dtype, channels_last, num_classes)
    xin = x.float() if provider.kind == "amp" else x
    if provider.kind != "eager" and channels_last:
        xin = xin.contiguous(memory_format=torch.channels_last)
    run = model
    freeze = contextlib.nullcontext
    if provider.kind == "compile":
        _compat.reset_compiled()
        if mode == "inference":
            if compile_mode == "auto":
                compile_mode = "max-autotune" if device.type == "cuda" else None
            run = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)

            freeze = _compat.inductor_freezing
        else:
            run = torch.compile(model)

    if mode == "inference":
        model.eval()

        def call() -> torch.Tensor:
            with torch.no_grad(), freeze(), _autocast(provider, device, dtype), fusions_of(provider):
                return run(xin)

        return Step(call, model)
    if mode != "train":
        raise ValueError(f"mode must be 'inference' or 'train', got {mode!r}")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def call() -> torch.Tensor:
        with fusions_of(provider):
            with _autocast(provider, device, dtype):
                out = run(xin)
                loss = F.cross_entropy(out.float(), y)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.detach()

    return Step(call, model)


def reference_logits(model_name: str, state_dict, x: torch.Tensor, mode: str, num_classes: int = 1000) -> torch.Tensor:
    """The high-precision reference: fp64 on CPU for CPU runs; fp32 with TF32
    off on the GPU for GPU runs (docs/numerics.md)."""
    m = eager_builder(model_name)(num_classes)
    m.load_state_dict(state_dict)
    m.train(mode == "train")
    if x.device.type == "cpu":
        m = m.double()
        with torch.no_grad():
            return m(x.double())
    m = m.to(x.device)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            return m(x.float())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
