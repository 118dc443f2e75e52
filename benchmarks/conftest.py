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

import statistics

import pytest
import torch

from fused_resnet import numerics
from fused_resnet.tools.bench.providers import fused_backend_params  # noqa: F401 - re-exported for benchmark files
from fused_resnet.tools.bench.timing import synchronize, timed_call

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


# (test id, ratio name, median ratio, rounds) of every side_by_side
# measurement, printed at the end of the session.
SIDE_BY_SIDE: list[tuple[str, str, float, int]] = []


def side_by_side_ratio(base, new, device: torch.device, rounds: int = 20, warmup: int = 2) -> float:
    """median(base time) / median(new time) with the two called in
    alternation (base, new, base, new, ...): a drift in the machine's speed
    hits both alike, which separate pytest-benchmark runs minutes apart do
    not (on a shared VM their ratio can swing 2x). > 1 means `new` is faster."""
    for _ in range(warmup):
        base()
        new()
        synchronize(device)
    tb, tn = [], []
    for _ in range(rounds):
        tb.append(timed_call(base, device)[0])
        tn.append(timed_call(new, device)[0])
    return statistics.median(tb) / statistics.median(tn)


@pytest.fixture
def side_by_side(request, benchmark):
    """side_by_side_ratio, recorded in benchmark.extra_info[name] and in the
    session summary: side_by_side(name, base_fn, new_fn, device, rounds=20)."""

    def measure(name, base, new, device, rounds: int = 20) -> float:
        ratio = side_by_side_ratio(base, new, device, rounds)
        benchmark.extra_info[name] = round(ratio, 3)
        SIDE_BY_SIDE.append((request.node.name, name, ratio, rounds))
        return ratio

    return measure


def pytest_terminal_summary(terminalreporter):
    if not SIDE_BY_SIDE:
        return
    terminalreporter.section("side by side (the two called in alternation; median ratio)")
    width = max(len(t) for t, _, _, _ in SIDE_BY_SIDE)
    for test, name, ratio, rounds in SIDE_BY_SIDE:
        terminalreporter.write_line(f"{test:<{width}}  {name} = {ratio:.2f}  ({rounds} rounds)")


@pytest.fixture
def timed():
    return run_timed
