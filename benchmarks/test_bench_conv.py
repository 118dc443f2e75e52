"""Triton conv vs cuDNN (F.conv2d) at ResNet-50 layer shapes, bf16, batch 256,
channels_last, on a GPU (skipped without one). Two comparisons per layer:
  conv:        our kernel, no epilogue  vs  F.conv2d          (target >= 0.9x cuDNN's speed)
  conv_bn_add_relu: our kernel with scale/shift + residual + ReLU  vs  F.conv2d
               then eager BN (eval, folded into scale/shift) + add + ReLU
               (target: faster than cuDNN + eager)
Each benchmark checks its output against the other provider before timing,
excludes autotuning (done in the warm-up call) and records TFLOP/s in
benchmark.extra_info. Run: pytest benchmarks/test_bench_conv.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BATCH = 256
# (C_in, H, W, C_out, k, stride, padding)
LAYERS = {
    "stem_7x7_s2": (3, 224, 224, 64, 7, 2, 3),
    "l1_1x1_reduce": (256, 56, 56, 64, 1, 1, 0),
    "l1_3x3": (64, 56, 56, 64, 3, 1, 1),
    "l1_1x1_expand": (64, 56, 56, 256, 1, 1, 0),
    "l2_3x3_s2": (128, 56, 56, 128, 3, 2, 1),
    "l2_3x3": (128, 28, 28, 128, 3, 1, 1),
    "l3_3x3": (256, 14, 14, 256, 3, 1, 1),
    "l3_1x1_expand": (256, 14, 14, 1024, 1, 1, 0),
    "l4_3x3": (512, 7, 7, 512, 3, 1, 1),
    "l4_1x1_expand": (512, 7, 7, 2048, 1, 1, 0),
}


def _setup(name):
    ci, h, w, co, k, s, p = LAYERS[name]
    x = torch.randn(BATCH, ci, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(co, ci, k, k, device="cuda") / (ci * k * k) ** 0.5).to(torch.bfloat16)
    wt = wt.contiguous(memory_format=torch.channels_last)
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    r = torch.randn(BATCH, co, oh, ow, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    bn = torch.nn.BatchNorm2d(co).cuda().eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).float()
    shift = (bn.bias - bn.running_mean * scale).float()
    flops = 2.0 * BATCH * oh * ow * co * ci * k * k
    return x, wt, r, bn.to(torch.bfloat16), scale, shift, dict(stride=s, padding=p), flops


def _run(benchmark, fn, flops):
    fn()  # warm-up: compile + autotune, excluded from timing
    torch.cuda.synchronize()

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=20, iterations=5, warmup_rounds=2)
    benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12
    benchmark.extra_info["device"] = torch.cuda.get_device_name()


@pytest.mark.parametrize("provider", ["cudnn", "triton"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_conv(benchmark, name, provider):
    from fused_resnet.backends.triton import launch

    x, wt, _, _, _, _, conv, flops = _setup(name)
    benchmark.group = f"conv {name}"
    if provider == "cudnn":
        fn = lambda: F.conv2d(x, wt, None, **conv)  # noqa: E731
    else:
        fn = lambda: launch.conv2d_bn_act(x, wt, None, None, None, False, conv["stride"], conv["padding"], 1, 1, False)  # noqa: E731
    want = F.conv2d(x.float(), wt.float(), None, **conv)
    torch.testing.assert_close(fn()[0].float() if provider == "triton" else fn().float(), want, rtol=3e-2, atol=3e-2)
    _run(benchmark, fn, flops)


@pytest.mark.parametrize("provider", ["cudnn+eager", "triton"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_conv_bn_add_relu(benchmark, name, provider):
    from fused_resnet.backends.triton import launch

    x, wt, r, bn, scale, shift, conv, flops = _setup(name)
    benchmark.group = f"conv+bn+add+relu {name}"
    if provider == "cudnn+eager":
        fn = lambda: torch.relu(bn(F.conv2d(x, wt, None, **conv)) + r)  # noqa: E731
    else:
        fn = lambda: launch.conv2d_bn_act(x, wt, scale, shift, r, True, conv["stride"], conv["padding"], 1, 1, False)[0]  # noqa: E731
    with torch.no_grad():
        want = torch.relu(bn(F.conv2d(x, wt, None, **conv)).float() + r.float())
        torch.testing.assert_close(fn().float(), want, rtol=5e-2, atol=5e-2)
        _run(benchmark, fn, flops)
