"""The Triton conv on a GPU at real ResNet-50 shapes, bf16/fp16/fp32, batch 1
and 256, against F.conv2d + the reference epilogue by the numerics criterion
(fp64 reference computed on the CPU from the same inputs). Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

import fused_resnet
from fused_resnet import numerics
from fused_resnet.ops import reference

pytestmark = pytest.mark.cuda

# (C_in, H, W, C_out, k, stride, padding): ResNet-50 convs (torchvision v1.5:
# stride on the 3x3), stem to layer4, incl. the downsample 1x1 s2.
RESNET50 = {
    "stem_7x7_s2": (3, 224, 224, 64, 7, 2, 3),
    "l1_1x1_reduce": (256, 56, 56, 64, 1, 1, 0),
    "l1_3x3": (64, 56, 56, 64, 3, 1, 1),
    "l1_1x1_expand": (64, 56, 56, 256, 1, 1, 0),
    "l2_3x3_s2": (128, 56, 56, 128, 3, 2, 1),
    "l2_downsample_s2": (256, 56, 56, 512, 1, 2, 0),
    "l3_3x3": (256, 14, 14, 256, 3, 1, 1),
    "l4_1x1_expand": (512, 7, 7, 2048, 1, 1, 0),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _inputs(name, batch, dtype):
    ci, h, w, co, k, s, p = RESNET50[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, ci, h, w, device="cuda", generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(co, ci, k, k, device="cuda", generator=g) / (ci * k * k) ** 0.5).to(dtype)
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    sc = torch.rand(co, device="cuda", generator=g) + 0.5
    sf = torch.randn(co, device="cuda", generator=g)
    r = torch.randn(batch, co, oh, ow, device="cuda", generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    return x, wt, sc, sf, r, dict(stride=s, padding=p)


def _assert_conv_outputs(out, eager, ref, dt, what):
    """y, the per-channel sum and sum of squares of conv2d_bn_act(...,
    emit_stats=True) against eager's and the fp64 reference's."""
    (y, s, q), (ye, se, qe), (yr, sr, qr) = out, eager, ref
    numerics.assert_close_to_reference(y, ye, yr, dtype=dt, what=f"{what}: y")
    numerics.assert_close_to_reference(s, se, sr, dtype=torch.float32, what=f"{what}: sum")
    numerics.assert_close_to_reference(q, qe, qr, dtype=torch.float32, what=f"{what}: sumsq")


def _prologue_vectors(ci):
    """The generator and the per-input-channel pre_scale / pre_shift of the
    BN + ReLU prologue tests."""
    g = torch.Generator(device="cuda").manual_seed(1)
    ps = torch.rand(ci, device="cuda", generator=g) + 0.5
    pt = torch.randn(ci, device="cuda", generator=g) * 0.5
    return g, ps, pt


@pytest.mark.parametrize("batch", [1, 256])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(RESNET50))
def test_resnet50_shapes(name, dtype, batch):
    from fused_resnet.backends.triton import launch

    dt = DTYPES[dtype]
    x, wt, sc, sf, r, conv = _inputs(name, batch, dt)
    out = launch.conv2d_bn_act(x, wt, sc, sf, r, True, conv["stride"], conv["padding"], 1, 1, True)
    eager = reference.conv2d_bn_act(x, wt, sc, sf, r, True, emit_stats=True, **conv)
    # fp64 reference on the GPU (cuDNN fp64), compared on the CPU.
    ref = reference.conv2d_bn_act(x.double(), wt.double(), sc.double(), sf.double(), r.double(), True,
                                  emit_stats=True, **conv)
    _assert_conv_outputs(out, eager, ref, dt, f"{name} {dtype} N={batch}")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_grouped_and_dilated(dtype):
    from fused_resnet.backends.triton import launch

    dt = DTYPES[dtype]
    for (ci, co, groups, dil) in [(128, 128, 32, 1), (256, 256, 32, 1), (256, 256, 1, 2)]:
        x = torch.randn(8, ci, 28, 28, device="cuda").to(dt).contiguous(memory_format=torch.channels_last)
        wt = (torch.randn(co, ci // groups, 3, 3, device="cuda") / (9 * ci // groups) ** 0.5).to(dt)
        y, _, _ = launch.conv2d_bn_act(x, wt, None, None, None, False, 1, dil, dil, groups, False)
        eager = reference.conv2d_bn_act(x, wt, padding=dil, dilation=dil, groups=groups)[0]
        ref = reference.conv2d_bn_act(x.double(), wt.double(), padding=dil, dilation=dil, groups=groups)[0]
        numerics.assert_close_to_reference(y, eager, ref, dtype=dt, what=f"groups={groups} dilation={dil}")


def test_fp32_respects_the_tf32_flag():
    from fused_resnet.backends.triton import launch

    x, wt, _, _, _, conv = _inputs("l3_3x3", 4, torch.float32)
    ref = torch.nn.functional.conv2d(x.double(), wt.double(), **conv)
    prev = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        ieee = launch.conv2d_bn_act(x, wt, None, None, None, False, 1, 1, 1, 1, False)[0]
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    # TF32 rounds inputs to 10 mantissa bits (~1e-3 relative); IEEE fp32 must be far closer.
    assert (ieee.double() - ref).abs().max() < 1e-4


def test_op_backward_on_gpu():
    from fused_resnet.ops import conv2d_bn_act

    x, wt, sc, sf, r, conv = _inputs("l3_3x3", 2, torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in (x, wt, sc, sf, r)]
    y, s, q = conv2d_bn_act(*leaves, relu=True, emit_stats=True, backend="triton", **conv)
    (y.square().sum() + s.sum() + 0.01 * q.sum()).backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, wt, sc, sf, r)]
    yr, sr, qr = reference.conv2d_bn_act(*ref_leaves, relu=True, emit_stats=True, **conv)
    (yr.square().sum() + sr.sum() + 0.01 * qr.sum()).backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=2e-3, atol=2e-3)


# Stride-1 ResNet-50 convs: where the training blocks use the BN + ReLU
# prologue and its fused data gradient (fusions "prologue", "prologue_dgrad").
PROLOGUE_SHAPES = ["l1_1x1_reduce", "l1_3x3", "l1_1x1_expand", "l3_3x3", "l4_1x1_expand"]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", PROLOGUE_SHAPES)
def test_prologue_conv_and_its_fused_dgrad(name, dtype):
    from fused_resnet.backends.triton import launch

    dt = DTYPES[dtype]
    x, wt, _, _, _, conv = _inputs(name, 32, dt)
    g, ps, pt = _prologue_vectors(x.shape[1])
    p = conv["padding"]
    y, s, q = launch.conv2d_bn_act(x, wt, None, None, None, False, 1, p, 1, 1, True, pre_scale=ps, pre_shift=pt)
    eager = reference.conv2d_prologue_bn_act(x, ps, pt, wt, emit_stats=True, **conv)
    ref = reference.conv2d_prologue_bn_act(x.double(), ps.double(), pt.double(), wt.double(), emit_stats=True,
                                           **conv)
    numerics.assert_close_to_reference(y, eager[0], ref[0], dtype=dt, what=f"{name} {dtype}: prologue y")

    dz = torch.randn(y.shape, device="cuda", generator=g).to(dt).contiguous(memory_format=torch.channels_last)
    got = launch.conv2d_dgrad_prologue(dz, wt, x, ps, pt, p, 1, 1)
    eager = reference.conv2d_dgrad_prologue(dz, wt, x, ps, pt, p, 1, 1)
    ref = reference.conv2d_dgrad_prologue(dz.double(), wt.double(), x.double(), ps.double(), pt.double(), p, 1, 1)
    for what, a, e, rf in zip(("dx", "d_pre_scale", "d_pre_shift"), got, eager, ref):
        numerics.assert_close_to_reference(a, e, rf, dtype=dt, kind="grad", what=f"{name} {dtype}: {what}")


# Tests run with FUSED_RESNET_AUTOTUNE=0 (tests/conftest.py): each problem
# takes its first candidate. These two cover the others and the autotuner.
CONFIG_SHAPES = ["stem_7x7_s2", "l1_1x1_reduce", "l2_3x3_s2", "l3_3x3"]  # flat-K, GEMM, strided and channel-block


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("name", CONFIG_SHAPES)
def test_every_candidate_config_matches_the_reference(name, dtype):
    from fused_resnet.backends.triton import conv_configs, launch

    dt = DTYPES[dtype]
    x, wt, sc, sf, r, conv = _inputs(name, 2, dt)
    eager = reference.conv2d_bn_act(x, wt, sc, sf, r, True, emit_stats=True, **conv)
    ref = reference.conv2d_bn_act(x.double(), wt.double(), sc.double(), sf.double(), r.double(), True,
                                  emit_stats=True, **conv)
    arch = conv_configs.arch_family(torch.cuda.get_device_capability())
    cands = conv_configs.candidates(arch, dt.itemsize, wt.shape[0])
    assert len(cands) > 1
    for cfg in cands:
        out = launch.conv2d_bn_act(x, wt, sc, sf, r, True, conv["stride"], conv["padding"], 1, 1, True, config=cfg)
        _assert_conv_outputs(out, eager, ref, dt, f"{name} {dtype} config {cfg.name}")


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_every_dgrad_candidate_config_matches_the_reference(dtype):
    from fused_resnet.backends.triton import conv_configs, launch

    dt = DTYPES[dtype]
    x, wt, _, _, _, conv = _inputs("l3_3x3", 2, dt)
    ci = x.shape[1]
    g, ps, pt = _prologue_vectors(ci)
    dz = torch.randn(x.shape[0], wt.shape[0], x.shape[2], x.shape[3], device="cuda", generator=g)
    dz = dz.to(dt).contiguous(memory_format=torch.channels_last)
    p = conv["padding"]
    eager = reference.conv2d_dgrad_prologue(dz, wt, x, ps, pt, p, 1, 1)
    ref = reference.conv2d_dgrad_prologue(dz.double(), wt.double(), x.double(), ps.double(), pt.double(), p, 1, 1)
    arch = conv_configs.arch_family(torch.cuda.get_device_capability())
    cands = conv_configs.dgrad_candidates(arch, dt.itemsize, ci)
    assert len(cands) > 1
    for cfg in cands:
        got = launch.conv2d_dgrad_prologue(dz, wt, x, ps, pt, p, 1, 1, config=cfg)
        for what, a, e, rf in zip(("dx", "d_pre_scale", "d_pre_shift"), got, eager, ref):
            numerics.assert_close_to_reference(a, e, rf, dtype=dt, kind="grad", what=f"{dtype} {cfg.name}: {what}")


def test_autotuner_times_every_candidate_and_caches_its_choice(tmp_path, monkeypatch):
    """FUSED_RESNET_AUTOTUNE=1 on a real GPU: every candidate is timed once,
    the fastest is used and written to the disk cache, and the next process
    (an empty in-memory table) reads it back without timing."""
    from fused_resnet.backends.triton import autotune_cache, launch

    fused_resnet.set_autotune(True)
    fused_resnet.set_cache_dir(tmp_path)
    monkeypatch.setattr(autotune_cache, "_caches", {})
    monkeypatch.setattr(launch, "_chosen", {})
    timed = []
    real = launch._benchmark
    monkeypatch.setattr(launch, "_benchmark", lambda run, cfg: timed.append(cfg.name) or real(run, cfg))
    x, wt, sc, sf, r, conv = _inputs("l3_3x3", 4, torch.bfloat16)
    y = launch.conv2d_bn_act(x, wt, sc, sf, r, True, conv["stride"], conv["padding"], 1, 1, False)[0]
    assert len(timed) > 1 and len(set(timed)) == len(timed)
    (key, chosen), = launch._chosen.items()
    assert autotune_cache.get_cache(launch.KERNEL_VERSION).get(key) == chosen.name
    launch._chosen.clear()
    timed.clear()
    y2 = launch.conv2d_bn_act(x, wt, sc, sf, r, True, conv["stride"], conv["padding"], 1, 1, False)[0]
    assert not timed and launch._chosen[key] == chosen
    torch.testing.assert_close(y2, y, rtol=0, atol=0)  # same config, same inputs
