"""Op level: BatchNorm (training, batch statistics) + residual add + ReLU,
eager (F.batch_norm + add + relu) vs fused_resnet.ops.batch_norm_act, at the
ResNet-50 stage shapes, forward and forward + backward, channels_last.

CPU: fp32, batch $FUSED_RESNET_BENCH_BATCH (8). GPU: bf16, batch 256, with
the achieved GB/s (minimum bytes moved by the fused passes) in extra_info.
Outputs are checked against the fp64 reference before timing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_resnet
from fused_resnet import dispatch, numerics
from fused_resnet.ops import batch_norm_act

from bench_settings import BATCH, DEVICE, DTYPE  # benchmarks/ is on sys.path under pytest

STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]
_NO_KERNELS = pytest.mark.skipif(dispatch.resolve(None, DEVICE) == "reference",
                                 reason="no fused BN kernels for this device (extension not built)")
# fused: what the fused models run (set_relu_saves default "output": the
# backward packs its ReLU mask from y); fused-mask: the 1-bit mask saved by
# the forward (set_relu_saves("mask")).
PROVIDERS = ["eager", pytest.param("fused", marks=_NO_KERNELS), pytest.param("fused-mask", marks=_NO_KERNELS)]


def _eager(z, w, b, rm, rv, nbt, r):
    return torch.relu(F.batch_norm(z, rm, rv, w, b, True, 0.1, 1e-5) + r)


def _fused(z, w, b, rm, rv, nbt, r):
    return batch_norm_act(z, w, b, rm, rv, nbt, training=True, momentum=0.1, eps=1e-5, residual=r)


def _state(C, H, device, dtype):
    torch.manual_seed(0)
    cl = torch.channels_last
    z = torch.randn(BATCH, C, H, H, device=device).mul_(2).add_(0.5).to(dtype).to(memory_format=cl)
    r = torch.randn(BATCH, C, H, H, device=device).to(dtype).to(memory_format=cl)
    w = torch.rand(C, device=device) + 0.5
    b = torch.randn(C, device=device) * 0.1
    return z, r, w, b


def _bytes(z, backward):
    # Fused minimum ("mask" mode): forward reads z twice (stats, apply) and r,
    # writes y and the 1-bit mask; backward reads dy and z twice and the mask
    # twice, writes dz and dr. ("output" mode reads y once more.)
    e = z.element_size() * z.numel()
    mask = z.numel() / 8
    fwd = 2 * e + e + e + mask
    bwd = 2 * e + 2 * e + 2 * mask + 2 * e
    return fwd + (bwd if backward else 0)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("C,H", STAGES, ids=[f"{c}x{h}x{h}" for c, h in STAGES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bn_add_relu(benchmark, timed, side_by_side, provider, C, H, backward):
    old = fused_resnet.relu_saves()
    fused_resnet.set_relu_saves("mask" if provider == "fused-mask" else "output")
    try:
        _measure(benchmark, timed, side_by_side, provider, C, H, backward)
    finally:
        fused_resnet.set_relu_saves(old)


def _measure(benchmark, timed, side_by_side, provider, C, H, backward):
    z, r, w, b = _state(C, H, DEVICE, DTYPE)
    fn = _eager if provider == "eager" else _fused

    def args():
        rm, rv = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
        nbt = torch.zeros((), dtype=torch.long, device=DEVICE)
        return rm, rv, nbt

    # Correctness before timing: y (and dz) against the fp64 reference.
    zz = z.detach().clone().requires_grad_()
    ze = z.detach().clone().requires_grad_()
    zr = z.detach().double().requires_grad_()
    y = fn(zz, w, b, *args(), r)
    ye = _eager(ze, w, b, *args(), r)
    yr = _eager(zr, w.double(), b.double(), *[t.double() if t.is_floating_point() else t for t in args()], r.double())
    numerics.assert_close_to_reference(y, ye, yr, dtype=DTYPE, what=f"{provider} y")
    if backward:
        g = torch.randn_like(y)
        y.backward(g)
        ye.backward(g)
        yr.backward(g.double())
        numerics.assert_close_to_reference(zz.grad, ze.grad, zr.grad, dtype=DTYPE, kind="grad",
                                           what=f"{provider} dz")

    g = torch.randn_like(z)

    def make_step(f):
        # Each side its own leaves and running statistics.
        zt = z.detach().clone().requires_grad_(backward)
        rt = r.detach().clone().requires_grad_(backward)
        wt, bt = w.detach().clone().requires_grad_(backward), b.detach().clone().requires_grad_(backward)
        st = args()

        def step():
            if backward:
                out = f(zt, wt, bt, *st, rt)
                out.backward(g)
                return out
            with torch.no_grad():
                return f(zt, wt, bt, *st, rt)

        return step

    step = make_step(fn)
    # CPU: enough rounds that the median is not one of the calls that fault
    # fresh pages in (the allocator returns big blocks to the OS between calls).
    timed(benchmark, step, DEVICE, rounds=20, warmup_rounds=3)
    if provider != "eager":
        # The ratio that answers "faster than eager?": both in alternation.
        side_by_side("eager/fused", make_step(_eager), step, DEVICE)
    if benchmark.stats is not None:
        secs = benchmark.stats.stats.median
        benchmark.extra_info["GB/s (fused minimum bytes)"] = round(_bytes(z, backward) / secs / 1e9, 1)
        benchmark.extra_info["dtype"] = str(DTYPE)
