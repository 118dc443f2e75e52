"""What tests in several folders share: the repository's paths, the CUDA
skip, a fused model with an eager torchvision twin and an fp64 reference
with identical weights, comparisons under the numerics criterion
(fused_resnet.numerics), and a counter of Triton kernel launches.
(tests/ is on sys.path: pyproject.toml's pytest `pythonpath`.)"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
import torch
import torchvision

import fused_resnet
from fused_resnet import numerics

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# The fewest values per channel a BatchNorm computing batch statistics may
# see in a test that compares results (why: numerics.MIN_BATCH_STATS_VALUES;
# enforced by conftest.py).
MIN_BN_VALUES = numerics.MIN_BATCH_STATS_VALUES


def fuzz_settings(name: str, examples: int):
    """The Hypothesis settings of a property-test module, in two modes.

    Gate (CI set, as .ci/run sets it): derandomised, so a clean clone tries
    the same examples on every run and CI's verdict depends on the code
    alone; no example database. Discovery (everywhere else, and `make fuzz`
    with many examples): fresh examples on each run, failures kept in
    tests/.hypothesis-db and replayed until they pass. A failure worth
    keeping for good becomes an @example on the test (see that folder's
    README)."""
    from hypothesis import HealthCheck, settings
    from hypothesis.database import DirectoryBasedExampleDatabase

    gate = bool(os.environ.get("CI"))
    settings.register_profile(
        name, max_examples=examples, deadline=None, derandomize=gate, print_blob=True,
        database=None if gate else DirectoryBasedExampleDatabase(str(TESTS / ".hypothesis-db")),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    return settings.get_profile(name)


def randomise_bn(model: torch.nn.Module) -> None:
    # Non-trivial BN parameters and running stats, so a wrong fold or a
    # dropped affine shows up in the outputs.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)


def make_trio(name: str = "resnet18", device: str = "cpu"):
    """(fused, eager, fp64 reference) torchvision-style models, same weights."""
    torch.manual_seed(0)
    eager = getattr(torchvision.models, name)(num_classes=10)
    randomise_bn(eager)
    fused = fused_resnet.MODEL_BUILDERS[name](num_classes=10)
    fused.load_state_dict(eager.state_dict())
    ref = copy.deepcopy(eager).double()
    return fused.to(device), eager.to(device), ref


def check_grads(fused, eager, ref, what: str) -> None:
    """Normwise over every parameter gradient (ReLU ties make an elementwise
    max a lottery across a whole fp32 network)."""
    fp, ep, rp = (list(m.named_parameters()) for m in (fused, eager, ref))
    for name, p in fp:
        assert p.grad is not None, f"{what}: no gradient for {name}"
    v = numerics.compare_normwise([p.grad for _, p in fp], [p.grad for _, p in ep], [p.grad for _, p in rp])
    assert v.ok, f"{what}: parameter gradients outside the criterion: {v}"


def check_buffers(fused, eager, ref, what: str) -> None:
    for (name, bf), (_, be), (_, br) in zip(fused.named_buffers(), eager.named_buffers(), ref.named_buffers()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(bf.cpu(), be.cpu()), f"{what}: {name}"
        else:
            numerics.assert_close_to_reference(bf, be, br, what=f"{what}: {name}")


def forward_backward(model, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    y = model(x.to(next(model.parameters()).dtype))
    y.backward(grad.to(y.dtype))
    return y


def compare_step(fused, eager, ref, x: torch.Tensor, train: bool, what: str, backward: bool = True) -> None:
    """One forward (and backward) of each model; fused vs eager vs fp64."""
    for m in (fused, eager, ref):
        m.train(train)
    yf, ye, yr = fused(x), eager(x), ref(x.detach().cpu().double())
    numerics.assert_close_to_reference(yf, ye, yr, what=f"{what}: logits")
    if backward:
        g = torch.randn(yr.shape, dtype=torch.float64)
        yf.backward(g.to(yf.device, yf.dtype))
        ye.backward(g.to(ye.device, ye.dtype))
        yr.backward(g)
        check_grads(fused, eager, ref, what)
    check_buffers(fused, eager, ref, what)


def count_kernel_launches(monkeypatch, *names: str) -> dict[str, int]:
    """Count launches (kernel[grid](...)) of the named Triton kernels of
    fused_resnet.backends.triton.launch, e.g. "conv2d_fwd_prologue_kernel", for the
    rest of the test; returns the live {name: count} dict. Launches made
    while autotuning (timing candidate configs on a GPU) are not counted."""
    from fused_resnet.backends.triton import launch

    counts = dict.fromkeys(names, 0)

    class Spy:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            if not launch.tuning():
                counts[self.name] += 1
            return self.kernel[grid]

    for name in names:
        monkeypatch.setattr(launch, name, Spy(getattr(launch, name), name))
    return counts


def find_ptxas() -> str | None:
    """The ptxas the ahead-of-time compile tests run: $CUDA_HOME's, the one
    on PATH, else the one Triton ships; None without any."""
    import triton

    for cand in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "ptxas"), shutil.which("ptxas"),
                 os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        if cand and os.path.exists(cand):
            return cand
    return None
