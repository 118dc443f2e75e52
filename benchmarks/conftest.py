"""Shared set-up of `pytest benchmarks/` (pytest-benchmark).

Device and dtype (bench_settings.py): the GPU in bf16 when one is visible,
else the CPU in fp32; $FUSED_RESNET_BENCH_DEVICE (cpu | cuda) overrides the
device. Sizes are small
on CPU (the suite finishes in minutes on two cores) and training-scale on GPU.

Every benchmark checks its output against the reference before timing
(`check_output`), and times through `run_timed`, which synchronises inside
the timed call on GPU. Providers: eager vs each fused backend; backends that
cannot run here are skipped with the reason (fused_backend_params).
"""

from __future__ import annotations

import pytest
import torch

from fused_resnet import numerics
from fused_resnet.bench.providers import fused_backend_params  # noqa: F401 - re-exported for benchmark files
from fused_resnet.bench.timing import synchronize

# References without TF32, as in tests/ (../DESIGN.md, numerics policy).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

from bench_settings import BATCH, DEVICE, DTYPE, ON_GPU  # noqa: E402,F401 - re-exported


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("FUSED_RESNET_BENCH_DEVICE=cuda but no CUDA GPU is visible")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda" in item.keywords and not ON_GPU:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def pytest_report_header(config):
    import fused_resnet

    av = fused_resnet.availability()
    return (f"benchmarks on {DEVICE} ({torch.cuda.get_device_name(DEVICE) if ON_GPU else 'cpu'}), {DTYPE}, "
            f"batch {BATCH}; backends: " + ", ".join(f"{k}={'yes' if v.available else 'no'}" for k, v in av.items()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def dtype() -> torch.dtype:
    return DTYPE


@pytest.fixture
def on_gpu() -> bool:
    return ON_GPU


def check_output(out: torch.Tensor, eager_out: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype,
                 kind: str = "output", what: str = "") -> numerics.Verdict:
    """Assert `out` is within the numerics criterion (relative to eager's own
    error against the high-precision reference). Call before timing."""
    return numerics.assert_close_to_reference(out, eager_out, reference, dtype=dtype, kind=kind, what=what)


@pytest.fixture
def check():
    return check_output


def run_timed(benchmark, fn, device: torch.device, rounds: int | None = None, warmup_rounds: int = 1):
    """benchmark.pedantic with a device synchronisation inside every timed
    call, so GPU work is timed to completion. Returns fn's last result."""

    def synced():
        out = fn()
        synchronize(device)
        return out

    if rounds is None:
        rounds = 20 if device.type == "cuda" else 3
    return benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)


@pytest.fixture
def timed():
    return run_timed
