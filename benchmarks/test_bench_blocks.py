"""Block level: torchvision's BasicBlock / Bottleneck (eager) vs the fused
blocks on every backend that runs here, at each ResNet-18 / ResNet-50 stage
shape (224x224 input; the stride-1 block that makes up most of each stage),
in eval (forward, no_grad) and train (forward + backward) mode.

Both providers run in channels_last, the layout the fused kernels target.
extra_info: images/s, and TFLOP/s and GB/s from the analytic conv FLOPs and
minimum bytes (train: 3x the forward FLOPs — forward, data and weight
gradients).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models.resnet import BasicBlock, Bottleneck

from fused_resnet import FusedBasicBlock, FusedBottleneck, set_fusions
from fused_resnet.tools.bench.providers import fused_backend_params
from fused_resnet.tools.bench.roofline import conv_layers
from fused_resnet.tools.bench.verify import randomize_bn_state

from bench_settings import BATCH, DEVICE  # benchmarks/ is on sys.path under pytest

# (name, eager class, fused class, inplanes, planes, spatial size)
STAGES = [
    ("basic-l1", BasicBlock, FusedBasicBlock, 64, 64, 56),
    ("basic-l2", BasicBlock, FusedBasicBlock, 128, 128, 28),
    ("basic-l3", BasicBlock, FusedBasicBlock, 256, 256, 14),
    ("basic-l4", BasicBlock, FusedBasicBlock, 512, 512, 7),
    ("bottleneck-l1", Bottleneck, FusedBottleneck, 256, 64, 56),
    ("bottleneck-l2", Bottleneck, FusedBottleneck, 512, 128, 28),
    ("bottleneck-l3", Bottleneck, FusedBottleneck, 1024, 256, 14),
    ("bottleneck-l4", Bottleneck, FusedBottleneck, 2048, 512, 7),
]
# Training ablations of the triton provider: fusion switches per provider id.
ABLATIONS = {
    "triton+prologue": dict(prologue=True),                           # inner BN + ReLU in the next conv's prologue
    "triton+prologue-nodgrad": dict(prologue=True, prologue_dgrad=False),  # ... with the unfused data gradient
}


def _with_prologue_ablation(params: list) -> list:
    """The triton provider again with each ABLATIONS entry's fusions
    (training blocks only)."""
    out = list(params)
    for p in params:
        if p.values[0] == "triton":
            out += [pytest.param(name, id=f"fused-{name}", marks=p.marks) for name in ABLATIONS]
    return out


PROVIDERS = [pytest.param("eager", id="eager")] + _with_prologue_ablation(fused_backend_params(DEVICE))


def _blocks(eager_cls, fused_cls, inplanes, planes, provider, device, dtype):
    torch.manual_seed(0)
    eager = eager_cls(inplanes, planes)
    randomize_bn_state(eager)
    reference = copy.deepcopy(eager)
    if provider == "eager":
        model = copy.deepcopy(eager)
    else:
        model = fused_cls(inplanes, planes, backend=provider)
        model.load_state_dict(eager.state_dict())
    cl = torch.channels_last
    eager = eager.to(device, dtype, memory_format=cl)
    model = model.to(device, dtype, memory_format=cl)
    # High-precision reference: fp64 on CPU, fp32 (TF32 off) on GPU.
    reference = reference.double() if device.type == "cpu" else reference.to(device).float()
    return eager, model, reference.to(memory_format=cl)


def _step(model, x, grad_out, train):
    if not train:
        with torch.no_grad():
            return model(x)
    x.grad = None
    out = model(x)
    out.backward(grad_out)
    return out.detach()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("stage", STAGES, ids=[s[0] for s in STAGES])
def test_block(benchmark, timed, check, device, dtype, stage, mode, provider):
    if provider in ABLATIONS:
        if mode != "train":
            pytest.skip("the prologue fusions are a training path")
        old = set_fusions(**ABLATIONS[provider])
        try:
            _bench_block(benchmark, timed, check, device, dtype, stage, mode, "triton")
        finally:
            set_fusions(**old)
        return
    _bench_block(benchmark, timed, check, device, dtype, stage, mode, provider)


def _bench_block(benchmark, timed, check, device, dtype, stage, mode, provider):
    name, eager_cls, fused_cls, inplanes, planes, hw = stage
    train = mode == "train"
    eager, model, reference = _blocks(eager_cls, fused_cls, inplanes, planes, provider, device, dtype)
    for m in (eager, model, reference):
        m.train(train)
    x = torch.randn(BATCH, inplanes, hw, hw, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(train)
    grad_out = torch.randn(BATCH, planes * eager_cls.expansion, hw, hw, device=device).to(dtype)
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)

    # Verify before timing: output and (train) input gradient.
    x_ref = x.detach().to(reference.conv1.weight.dtype).requires_grad_(train)
    out_ref = _step(reference, x_ref, grad_out.to(x_ref.dtype), train)
    out_eager = _step(eager, x, grad_out, train)
    gx_eager = x.grad.clone() if train else None
    out = _step(model, x, grad_out, train)
    check(out, out_eager, out_ref, dtype, what=f"{name} {mode} output")
    if train:
        check(x.grad, gx_eager, x_ref.grad, dtype, kind="grad", what=f"{name} {mode} input gradient")

    benchmark.group = f"block {name} {mode}"
    timed(benchmark, lambda: _step(model, x, grad_out, train), device)
    convs = [layer for layer, _, _ in conv_layers(eager.eval(), x.detach())]
    flops, nbytes = sum(c.flops for c in convs), sum(c.min_bytes for c in convs)
    if benchmark.stats is not None:  # None under --benchmark-disable
        t = benchmark.stats.stats.median
        mult = 3 if train else 1
        benchmark.extra_info.update(images_per_s=BATCH / t, tflops=mult * flops / t / 1e12,
                                    gbps=mult * nbytes / t / 1e9, shape=f"{BATCH}x{inplanes}x{hw}x{hw}",
                                    dtype=str(dtype), device=str(device))
