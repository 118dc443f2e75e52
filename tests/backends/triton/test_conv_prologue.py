"""fused_resnet::conv2d_prologue_bn_act: the previous layer's BN + ReLU in the
Triton conv's prologue. The kernel under the interpreter against the fp64
reference (every kernel mode, fp32 and fp16, padding that must stay zero),
its gradients against autograd through the reference, and in this process
the op's aten path, its autograd formula (gradcheck in fp64), fake kernel and
argument errors. AOT compilation for sm_80/sm_90: tests/backends/triton/test_triton_aot.py."""

from __future__ import annotations

import copy

import pytest
import torch

import fused_resnet
from fused_resnet import config, numerics
from fused_resnet.ops import conv2d_prologue_bn_act, reference
from interpreter import IN_INTERPRETER
from helpers import count_kernel_launches

# (N, C_in, H, W, C_out, k, stride, padding, dilation, groups), one per kernel
# mode and address pattern (see test_triton_conv.SHAPES).
SHAPES = {
    "1x1": (2, 24, 5, 7, 20, 1, 1, 0, 1, 1),            # MODE_GEMM
    "1x1_s2": (2, 40, 7, 7, 24, 1, 2, 0, 1, 1),         # MODE_CBLOCK, one tap
    "3x3_s1": (2, 40, 6, 5, 24, 3, 1, 1, 1, 1),         # MODE_CBLOCK, padded taps
    "3x3_thin_cin": (2, 8, 6, 6, 20, 3, 1, 1, 1, 1),    # MODE_FLAT
    "grouped_cin4": (2, 32, 5, 5, 32, 3, 1, 1, 1, 8),   # MODE_FLAT, groups
    "dilated": (1, 32, 9, 9, 16, 3, 1, 2, 2, 1),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
GRAD_SHAPES = ("1x1", "3x3_s1", "grouped_cin4")
# (shape, fusion prologue_dgrad): the fused data gradient on the stride-1
# shapes, and the unfused backward once for comparison.
GRAD_CASES = [(n, True) for n in GRAD_SHAPES] + [("3x3_s1", False)]


def _problem(shape, dtype, seed=0):
    n, ci, h, w, co, k, s, p, d, g = shape
    gen = torch.Generator().manual_seed(seed)
    # x is a raw conv output; the prologue's shift is mostly positive, so a
    # padded zero turned into relu(shift) would show.
    x = (torch.randn(n, ci, h, w, generator=gen) * 1.5 + 0.3).to(dtype).contiguous(memory_format=torch.channels_last)
    ps = torch.rand(ci, generator=gen) + 0.5
    pt = torch.randn(ci, generator=gen) * 0.5 + 0.6
    wt = (torch.randn(co, ci // g, k, k, generator=gen) / (ci // g * k * k) ** 0.5).to(dtype)
    oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
    ow = (w + 2 * p - d * (k - 1) - 1) // s + 1
    sc = torch.rand(co, generator=gen) + 0.5
    sf = torch.randn(co, generator=gen)
    r = torch.randn(n, co, oh, ow, generator=gen).to(dtype)
    return x, ps, pt, wt, sc, sf, r, dict(stride=s, padding=p, dilation=d, groups=g)


def _d64(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.interpreter
def test_interp_kernel_matches_reference(name, dtype, monkeypatch):
    calls = count_kernel_launches(monkeypatch, "conv2d_fwd_prologue_kernel")
    dt = DTYPES[dtype]
    x, ps, pt, wt, sc, sf, r, conv = _problem(SHAPES[name], dt)
    y, s, q = conv2d_prologue_bn_act(x, ps, pt, wt, sc, sf, r, True, emit_stats=True, backend="triton", **conv)
    assert calls["conv2d_fwd_prologue_kernel"], "the prologue kernel did not run"
    eager = reference.conv2d_prologue_bn_act(x, ps, pt, wt, sc, sf, r, True, emit_stats=True, **conv)
    ref = reference.conv2d_prologue_bn_act(*map(_d64, (x, ps, pt, wt, sc, sf, r)), True, emit_stats=True, **conv)
    assert y.dtype == dt and y.is_contiguous(memory_format=torch.channels_last)
    numerics.assert_close_to_reference(y, eager[0], ref[0], dtype=dt, what=f"{name} {dtype}: y")
    if dt == torch.float32:  # fp16: the kernel sums its fp32 accumulator, eager the rounded z
        numerics.assert_close_to_reference(s, eager[1], ref[1], dtype=dt, what=f"{name}: sum")
        numerics.assert_close_to_reference(q, eager[2], ref[2], dtype=dt, what=f"{name}: sumsq")


@pytest.mark.parametrize("name,fused_dgrad", GRAD_CASES)
@pytest.mark.interpreter
def test_interp_gradients_match_autograd_through_the_reference(name, fused_dgrad, monkeypatch):
    fused_resnet.set_fusions(prologue_dgrad=fused_dgrad)
    calls = count_kernel_launches(monkeypatch, "conv2d_dgrad_prologue_kernel")
    x, ps, pt, wt, sc, sf, r, conv = _problem(SHAPES[name], torch.float32, seed=1)
    gen = torch.Generator().manual_seed(2)

    def grads(fn, tensors, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
        y, s, q = fn(*leaves)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
        gs = torch.randn(s.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
        ((y * gy).sum() + (s * gs).sum() + (q * gq.to(dtype)).sum() * 1e-2).backward()
        return [t.grad for t in leaves]

    gq = torch.randn(wt.shape[0], generator=gen)
    tensors = (x, ps, pt, wt, sc, sf, r)
    fused = grads(lambda *t: conv2d_prologue_bn_act(*t, True, emit_stats=True, backend="triton", **conv),
                  tensors, torch.float32)
    eager = grads(lambda *t: reference.conv2d_prologue_bn_act(*t, True, emit_stats=True, **conv),
                  tensors, torch.float32)
    ref = grads(lambda *t: reference.conv2d_prologue_bn_act(*t, True, emit_stats=True, **conv),
                tensors, torch.float64)
    assert calls["conv2d_dgrad_prologue_kernel"] == (1 if fused_dgrad else 0)
    for what, f, e, rf in zip(("x", "pre_scale", "pre_shift", "weight", "scale", "shift", "residual"),
                              fused, eager, ref):
        numerics.assert_close_to_reference(f, e, rf, dtype=torch.float32, kind="grad", what=f"{name}: d{what}")


# Stride-1 shapes: the fused data gradient's kernel modes (1x1 -> MODE_GEMM,
# 3x3 -> MODE_CBLOCK with its own padding, thin/grouped -> MODE_FLAT, and a
# dilated conv whose data-gradient padding differs from the forward's).
DGRAD_SHAPES = ("1x1", "3x3_s1", "3x3_thin_cin", "grouped_cin4", "dilated")


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("name", DGRAD_SHAPES)
@pytest.mark.interpreter
def test_interp_fused_dgrad_kernel_matches_reference(name, dtype, monkeypatch):
    from fused_resnet.backends.triton import launch

    calls = count_kernel_launches(monkeypatch, "conv2d_dgrad_prologue_kernel")
    dt = DTYPES[dtype]
    x, ps, pt, wt, sc, sf, r, conv = _problem(SHAPES[name], dt, seed=3)
    dz = torch.randn(r.shape, generator=torch.Generator().manual_seed(6)).to(dt)
    args = (conv["padding"], conv["dilation"], conv["groups"])
    got = launch.conv2d_dgrad_prologue(dz, wt, x, ps, pt, *args)
    assert calls["conv2d_dgrad_prologue_kernel"] == 1
    eager = reference.conv2d_dgrad_prologue(dz, wt, x, ps, pt, *args)
    ref = reference.conv2d_dgrad_prologue(*map(_d64, (dz, wt, x, ps, pt)), *args)
    assert got[0].dtype == dt and got[0].is_contiguous(memory_format=torch.channels_last)
    for what, g, e, rf in zip(("dx", "d_pre_scale", "d_pre_shift"), got, eager, ref):
        numerics.assert_close_to_reference(g, e, rf, dtype=dt, kind="grad", what=f"{name} {dtype}: {what}")


# ------------------------------------------------ whole blocks in training

BLOCKS = {
    "bottleneck-s2": ("bottleneck", 8, 4, 2, True),   # 1x1 -> 3x3 s2 -> 1x1, projection shortcut
    "bottleneck-id": ("bottleneck", 16, 4, 1, False),  # identity shortcut
    "basic-s1": ("basic", 16, 16, 1, False),           # conv2 3x3 MODE_CBLOCK reads conv1's raw output
}


def _train_block(spec):
    kind, inplanes, planes, stride, proj = spec
    cls = fused_resnet.FusedBottleneck if kind == "bottleneck" else fused_resnet.FusedBasicBlock
    out = planes * cls.expansion
    torch.manual_seed(0)
    ds = torch.nn.Sequential(torch.nn.Conv2d(inplanes, out, 1, stride, bias=False),
                             torch.nn.BatchNorm2d(out)) if proj else None
    block = cls(inplanes, planes, stride, ds)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    block.train()
    ref = copy.deepcopy(block).double()
    eager = copy.deepcopy(block)
    for m in (ref, eager):
        m.backend = "reference"
    fused = block.to(memory_format=torch.channels_last)
    fused.backend = "triton"
    # 8x8 images, batch 4: >= 16 values per channel after a stride-2 conv.
    x = torch.randn(4, inplanes, 8, 8).contiguous(memory_format=torch.channels_last)
    return fused, eager, ref, x


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.interpreter
def test_interp_training_block_with_prologues_matches_eager(name, monkeypatch):
    fused_resnet.set_fusions(prologue=True)
    calls = count_kernel_launches(monkeypatch, "conv2d_fwd_prologue_kernel", "conv2d_dgrad_prologue_kernel")
    fused, eager, ref, x = _train_block(BLOCKS[name])
    n_inner = 2 if BLOCKS[name][0] == "bottleneck" else 1
    outs, grads_in = [], []
    for m in (fused, eager, ref):
        xi = x.detach().to(next(m.parameters()).dtype).requires_grad_()
        y = m(xi)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype))
        outs.append(y)
        grads_in.append(xi.grad)
    launched = calls["conv2d_fwd_prologue_kernel"]
    assert launched == n_inner, f"expected {n_inner} prologue convs, saw {launched}"
    # The stride-1 prologue convs' backward runs the fused data gradient.
    stride1_inner = n_inner - (1 if BLOCKS[name][3] == 2 else 0)
    assert calls["conv2d_dgrad_prologue_kernel"] == stride1_inner
    numerics.assert_close_to_reference(*outs, what=f"{name}: y")
    numerics.assert_close_to_reference(*grads_in, kind="grad", what=f"{name}: dx")
    named = [dict(m.named_parameters()) for m in (fused, eager, ref)]
    for pname in named[0]:
        numerics.assert_close_to_reference(*(p[pname].grad for p in named), kind="grad", what=f"{name}: d{pname}")
    bufs = [dict(m.named_buffers()) for m in (fused, eager, ref)]
    for bname in bufs[0]:
        if bname.endswith("num_batches_tracked"):
            assert torch.equal(bufs[0][bname], bufs[1][bname]), bname
        else:
            numerics.assert_close_to_reference(*(b[bname] for b in bufs), what=f"{name}: {bname}")


@pytest.mark.interpreter
def test_interp_compiled_training_block_traces_the_fused_backward(monkeypatch):
    """torch.compile traces the prologue op's backward with fake tensors: the
    fused data gradient must be an op there (with a fake kernel), not a
    Triton launch. aot_eager traces forward and backward as inductor would."""
    fused_resnet.set_fusions(prologue=True)
    calls = count_kernel_launches(monkeypatch, "conv2d_fwd_prologue_kernel", "conv2d_dgrad_prologue_kernel")
    fused, eager, ref, x = _train_block(BLOCKS["bottleneck-id"])
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    outs, grads_in = [], []
    for m in (compiled, eager, ref):
        xi = x.detach().to(next(ref.parameters()).dtype if m is ref else torch.float32).requires_grad_()
        y = m(xi)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype))
        outs.append(y)
        grads_in.append(xi.grad)
    assert calls["conv2d_fwd_prologue_kernel"] == 2 and calls["conv2d_dgrad_prologue_kernel"] == 2
    numerics.assert_close_to_reference(*outs, what="compiled: y")
    numerics.assert_close_to_reference(*grads_in, kind="grad", what="compiled: dx")
    named = [dict(m.named_parameters()) for m in (fused, eager, ref)]
    for pname in named[0]:
        numerics.assert_close_to_reference(*(p[pname].grad for p in named), kind="grad", what=f"compiled: d{pname}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_cuda_training_block_with_prologues_matches_eager(name, dtype, monkeypatch):
    """The same blocks on a GPU (Triton kernels compiled for it): fused and
    eager in `dtype` on CUDA, the fp64 reference on the CPU."""
    fused_resnet.set_fusions(prologue=True)
    calls = count_kernel_launches(monkeypatch, "conv2d_fwd_prologue_kernel", "conv2d_dgrad_prologue_kernel")
    fused, eager, ref, x = _train_block(BLOCKS[name])
    fused.to("cuda", dtype)
    eager.to("cuda", dtype).to(memory_format=torch.channels_last)
    outs, grads_in, gy = [], [], None
    for m, dev, dt in ((fused, "cuda", dtype), (eager, "cuda", dtype), (ref, "cpu", torch.float64)):
        xi = x.detach().to(dev, dt).requires_grad_()
        y = m(xi)
        if gy is None:
            gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
        y.backward(gy.to(dev, dt))
        outs.append(y.detach().cpu())
        grads_in.append(xi.grad.cpu())
    assert calls["conv2d_fwd_prologue_kernel"] == (2 if BLOCKS[name][0] == "bottleneck" else 1)
    numerics.assert_close_to_reference(*outs, dtype=dtype, what=f"{name}: y")
    numerics.assert_close_to_reference(*grads_in, dtype=dtype, kind="grad", what=f"{name}: dx")
    named = [dict(m.named_parameters()) for m in (fused, eager, ref)]
    for pname in named[0]:
        numerics.assert_close_to_reference(*(p[pname].grad.cpu() for p in named), dtype=dtype, kind="grad",
                                           what=f"{name}: d{pname}")



def test_prologue_switch_defaults_off_and_is_listed():
    assert "prologue" in fused_resnet.get_fusions()
    assert config.FUSION_DEFAULTS["prologue"] is False
    # Its backward's sub-switch, on by default (used only with the prologue).
    assert config.FUSION_DEFAULTS["prologue_dgrad"] is True


def test_fused_dgrad_argument_errors():
    from fused_resnet.backends.triton import launch

    x, ps, pt, wt, sc, sf, r, conv = _problem(SHAPES["3x3_s1"], torch.float32)
    dz = torch.randn(r.shape)
    n, _, h, w = x.shape
    with pytest.raises(ValueError, match="padding .* exceeds"):  # 3x3 with padding 3: a cropped dgrad
        launch.conv2d_dgrad_prologue(torch.randn(n, wt.shape[0], h + 4, w + 4), wt, x, ps, pt, 3, 1, 1)
    with pytest.raises(ValueError, match="`dz` has shape"):
        launch.conv2d_dgrad_prologue(dz[:, :, :-1], wt, x, ps, pt, 1, 1, 1)
    with pytest.raises(ValueError, match="`pre_scale` must have 40"):
        launch.conv2d_dgrad_prologue(dz, wt, x, ps[:3], pt, 1, 1, 1)
    with pytest.raises(TypeError, match="share one dtype"):
        launch.conv2d_dgrad_prologue(dz.half(), wt, x, ps, pt, 1, 1, 1)


# ------------------------------------------------ the op without Triton (this process)


def _op(x, ps, pt, wt, sc, sf, r, conv, relu=True, stats=True):
    return torch.ops.fused_resnet.conv2d_prologue_bn_act(
        x, ps, pt, wt, sc, sf, r, relu, [conv["stride"]] * 2, [conv["padding"]] * 2, [conv["dilation"]] * 2,
        conv["groups"], stats)


@pytest.mark.skipif(IN_INTERPRETER, reason="checks the path taken without the interpreter")
@pytest.mark.parametrize("name", ["3x3_s1", "grouped_cin4"])
def test_cpu_op_is_the_reference(name):
    x, ps, pt, wt, sc, sf, r, conv = _problem(SHAPES[name], torch.float32)
    got = _op(x, ps, pt, wt, sc, sf, r, conv)
    want = reference.conv2d_prologue_bn_act(x, ps, pt, wt, sc, sf, r, True, emit_stats=True, **conv)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(IN_INTERPRETER, reason="checks the path taken without the interpreter")
@pytest.mark.parametrize("name", ["1x1_s2", "3x3_s1"])
def test_gradcheck_of_the_registered_backward(name):
    n, ci, h, w, co, k, s, p, d, g = SHAPES[name]
    x, ps, pt, wt, sc, sf, r, conv = _problem((1, 4 * g, 4, 3, 2 * g, k, s, p, d, g), torch.float64)
    leaves = [t.detach().double().requires_grad_() for t in (x, ps, pt, wt, sc, sf, r)]

    def fn(*t):
        y, s_, q = _op(*t, conv)
        return y, s_, q

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5)


@pytest.mark.skipif(IN_INTERPRETER, reason="checks the path taken without the interpreter")
def test_opcheck():
    x, ps, pt, wt, sc, sf, r, conv = _problem(SHAPES["3x3_s1"], torch.float32)
    args = (x, ps, pt, wt, sc, sf, r, True, [1, 1], [1, 1], [1, 1], 1, True)
    torch.library.opcheck(torch.ops.fused_resnet.conv2d_prologue_bn_act.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.skipif(IN_INTERPRETER, reason="checks the path taken without the interpreter")
def test_dgrad_op_opcheck_and_reference_path():
    """fused_resnet::conv2d_dgrad_prologue without Triton: the reference,
    channels_last dx; schema and fake kernel by opcheck (no autograd: it is
    a gradient)."""
    x, ps, pt, wt, sc, sf, r, conv = _problem(SHAPES["grouped_cin4"], torch.float32)
    dz = torch.randn(r.shape)
    args = (dz, wt, x, ps, pt, [1, 1], [1, 1], conv["groups"])
    torch.library.opcheck(torch.ops.fused_resnet.conv2d_dgrad_prologue.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    got = fused_resnet.ops.conv2d_dgrad_prologue(dz, wt, x, ps, pt, 1, 1, conv["groups"])
    want = reference.conv2d_dgrad_prologue(dz, wt, x, ps, pt, 1, 1, conv["groups"])
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_bad_arguments_name_the_argument():
    x, ps, pt, wt, sc, sf, r, conv = _problem(SHAPES["3x3_s1"], torch.float32)
    with pytest.raises(ValueError, match="`pre_scale` must be a 1-D tensor of C_in=40"):
        conv2d_prologue_bn_act(x, ps[:5], pt, wt, **conv)
    with pytest.raises(ValueError, match="`pre_shift` must be a 1-D tensor"):
        conv2d_prologue_bn_act(x, ps, pt.view(1, -1), wt, **conv)
    with pytest.raises(ValueError, match="`x` must be 4-D"):
        conv2d_prologue_bn_act(x[0], ps, pt, wt, **conv)


