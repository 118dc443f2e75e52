"""The cudnn backend (csrc/cudnn/, fused_resnet/ops/cudnn_conv.py).

Without a GPU: the graph key, the build-once cache (a multi-threaded C++
self-test), the fake kernels and the availability reporting. With a GPU:
every graph against the fp64 reference under the numerics criterion, that
the fused graph (not the aten fallback) ran where cuDNN should accept it,
cache hits, and the autograd of conv_bias_act.
"""

import pytest
import torch
import torch.nn.functional as F

from fused_resnet import _backend, numerics
from fused_resnet.ops import cudnn_conv

from conftest import requires_cuda

requires_build = pytest.mark.skipif(
    not cudnn_conv.built(), reason=f"cudnn backend not built: {_backend._cudnn_frontend_reason()}")


# ---- without a GPU ------------------------------------------------------------


def test_availability_reports_the_build_and_the_device():
    av = _backend.availability()["cudnn"]
    if not cudnn_conv.built():
        assert not av.available and "not built" in av.reason
    elif not torch.cuda.is_available():
        assert not av.available and "no GPU" in av.reason
    else:
        assert av.available


def test_auto_never_selects_cudnn():
    # Until a recorded GPU run shows it correct at ResNet-50 shapes (issue 10).
    assert _backend.resolve("auto", torch.device("cuda")) != "cudnn"
    assert _backend.resolve("auto", torch.device("cpu")) != "cudnn"


def _key(variant, tensors, params=(1, 1, 0, 0, 1, 1, 1)):
    return cudnn_conv.graph_key(variant, tensors, params)


@requires_build
def test_graph_key_tells_apart_what_changes_the_plan():
    x = torch.randn(2, 8, 5, 5)
    w = torch.randn(4, 8, 3, 3)
    base = _key("bias_act", [x, w, None])
    # Same metadata, other data: same graph.
    assert _key("bias_act", [torch.randn_like(x), torch.randn_like(w), None]) == base
    assert _key("bias_act", [x.to("meta"), w.to("meta"), None]).replace("meta", "cpu") == base
    others = [
        _key("genstats", [x, w, None]),                                     # variant
        _key("bias_act", [x.half(), w.half(), None]),                       # dtype
        _key("bias_act", [x.to(memory_format=torch.channels_last), w, None]),  # layout
        _key("bias_act", [torch.randn(3, 8, 5, 5), w, None]),               # shape
        _key("bias_act", [x, w, torch.randn(4)]),                           # optional operand present
        _key("bias_act", [x, w, None], (2, 2, 0, 0, 1, 1, 1)),              # conv parameters
        _key("bias_act", [x.to("meta"), w.to("meta"), None]),               # device
    ]
    assert len(set(others + [base])) == len(others) + 1


@requires_build
def test_graph_key_sees_misaligned_views():
    buf = torch.randn(2 * 8 * 5 * 5 + 1)
    aligned = buf[:-1].view(2, 8, 5, 5)
    shifted = buf[1:].view(2, 8, 5, 5)  # 4-byte offset: a different alignment class
    w = torch.randn(4, 8, 3, 3)
    assert _key("bias_act", [aligned, w]) != _key("bias_act", [shifted, w])
    assert "a16" in _key("bias_act", [aligned, w]) and "a4" in _key("bias_act", [shifted, w])


@requires_build
@pytest.mark.parametrize("threads,keys,rounds", [(1, 3, 2), (6, 5, 4)])
def test_cache_builds_each_key_once_under_races(threads, keys, rounds):
    runs, hits, builds, refusals, entries, listed, wrong = torch.ops.fused_resnet.cudnn_cache_selftest(
        threads, keys, rounds)
    assert wrong == 0
    assert runs == keys  # every key built exactly once, refused key 0 included
    assert builds == keys - 1 and refusals == 1 and listed == 1
    assert entries == keys
    assert hits == threads * rounds * keys - keys


@requires_build
def test_cache_stats_and_fallbacks_are_readable():
    cudnn_conv.clear_cache()
    stats = cudnn_conv.cache_stats()
    assert stats == {"entries": 0, "hits": 0, "builds": 0, "refusals": 0}
    assert cudnn_conv.fallbacks() == []


@pytest.mark.skipif(not cudnn_conv._schemas_defined(), reason="fused_resnet._C predates the cudnn schemas")
def test_fake_kernels_give_shapes_and_layout():
    x = torch.empty(2, 8, 9, 9, device="meta")
    w = torch.empty(6, 4, 3, 3, device="meta")
    y = torch.ops.fused_resnet.cudnn_conv_bias_act(x, w, None, None, True, [2, 2], [1, 1], [1, 1], 2)
    assert y.shape == (2, 6, 5, 5) and y.is_contiguous(memory_format=torch.channels_last)
    z, s, q = torch.ops.fused_resnet.cudnn_conv_genstats(x, w, None, None, False, [1, 1], [0, 0], [1, 1], 2)
    assert z.shape == (2, 6, 7, 7) and s.shape == q.shape == (6,) and s.dtype == torch.float32
    dx = torch.ops.fused_resnet.cudnn_conv_dgrad(z, w, [2, 8, 9, 9], [1, 1], [0, 0], [1, 1], 2)
    dw = torch.ops.fused_resnet.cudnn_conv_wgrad(z, x, [6, 4, 3, 3], [1, 1], [0, 0], [1, 1], 2)
    assert dx.shape == x.shape and dw.shape == w.shape


def test_cpu_tensors_compute_the_contract():
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    b, r = torch.randn(5, dtype=torch.float64), torch.randn(2, 5, 6, 6, dtype=torch.float64)
    y = cudnn_conv.conv_bias_act(x, w, b, r, relu=True, padding=1)
    torch.testing.assert_close(y, torch.relu(F.conv2d(x, w, b, padding=1) + r))
    z, s, q = cudnn_conv.conv_genstats(x, w, padding=1)
    torch.testing.assert_close(s.double(), z.sum(dim=(0, 2, 3)))
    torch.testing.assert_close(q.double(), (z * z).sum(dim=(0, 2, 3)))


# ---- with a GPU ---------------------------------------------------------------

GPU = pytest.mark.skipif(not (torch.cuda.is_available() and cudnn_conv.built()),
                         reason="needs a CUDA GPU and the cudnn backend built")
FUSED_DTYPES = [torch.float16, torch.bfloat16]


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _new_fallbacks(before):
    return cudnn_conv.fallbacks()[len(before):]


def _bias_act_ref(x, w, b, r, relu, stride, padding):
    out = F.conv2d(x, w, None, stride, padding).float()
    if b is not None:
        out = out + b.float().view(1, -1, 1, 1)
    if r is not None:
        out = out + r.float()
    return torch.relu(out) if relu else out


@requires_cuda
@GPU
@pytest.mark.parametrize("dtype", FUSED_DTYPES + [torch.float32])
@pytest.mark.parametrize("residual,relu,stride,ksize", [(True, True, 1, 3), (False, True, 2, 1), (False, False, 1, 1)])
def test_conv_bias_act(dtype, residual, relu, stride, ksize):
    n, c, k, hw = 4, 32, 64, 14
    pad = ksize // 2
    x = _cl(torch.randn(n, c, hw, hw, device="cuda")).to(dtype)
    w = _cl(torch.randn(k, c, ksize, ksize, device="cuda") / (c * ksize * ksize) ** 0.5).to(dtype)
    b = torch.randn(k, device="cuda")
    out_hw = (hw + 2 * pad - ksize) // stride + 1
    r = _cl(torch.randn(n, k, out_hw, out_hw, device="cuda")).to(dtype) if residual else None
    before = cudnn_conv.fallbacks()
    y = cudnn_conv.conv_bias_act(x, w, b, r, relu, stride, pad)
    torch.cuda.synchronize()
    if dtype in FUSED_DTYPES:
        assert _new_fallbacks(before) == [], "cuDNN refused a graph it should run"
    ref = _bias_act_ref(x.cpu().double(), w.cpu().double(), b.cpu().double(),
                        None if r is None else r.cpu().double(), relu, stride, pad)
    eager = F.conv2d(x, w, b.to(dtype), stride, pad)
    eager = eager + r if r is not None else eager
    eager = torch.relu(eager) if relu else eager
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == dtype
    numerics.assert_close_to_reference(y, eager, ref, dtype=dtype, what=f"cudnn_conv_bias_act {dtype}")


@requires_cuda
@GPU
def test_cache_hits_on_repeat_calls():
    x = _cl(torch.randn(2, 16, 8, 8, device="cuda")).half()
    w = _cl(torch.randn(16, 16, 3, 3, device="cuda")).half()
    cudnn_conv.conv_bias_act(x, w, None, None, True, 1, 1)
    s0 = cudnn_conv.cache_stats()
    cudnn_conv.conv_bias_act(x, w, None, None, True, 1, 1)
    s1 = cudnn_conv.cache_stats()
    assert s1["hits"] == s0["hits"] + 1 and s1["builds"] + s1["refusals"] == s0["builds"] + s0["refusals"]


@requires_cuda
@GPU
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("prologue", [False, True])
def test_conv_genstats(dtype, prologue):
    n, c, k, hw = 4, 32, 64, 12
    x = _cl(torch.randn(n, c, hw, hw, device="cuda")).to(dtype)
    w = _cl(torch.randn(k, c, 3, 3, device="cuda") / (9 * c) ** 0.5).to(dtype)
    sc = torch.rand(c, device="cuda") + 0.5 if prologue else None
    sh = torch.randn(c, device="cuda") if prologue else None
    before = cudnn_conv.fallbacks()
    z, s, q = cudnn_conv.conv_genstats(x, w, sc, sh, prologue, 1, 1)
    torch.cuda.synchronize()
    if not prologue:  # the prologue needs the runtime-fusion engine: reported, not required
        assert _new_fallbacks(before) == [], "cuDNN refused the conv + genstats graph"
    xd = x.cpu().double()
    if prologue:
        xd = torch.relu(xd * sc.cpu().double().view(1, -1, 1, 1) + sh.cpu().double().view(1, -1, 1, 1))
    zref = F.conv2d(xd, w.cpu().double(), None, 1, 1)
    x_eager = x
    if prologue:
        x_eager = torch.relu(x.float() * sc.view(1, -1, 1, 1) + sh.view(1, -1, 1, 1)).to(dtype)
    z_eager = F.conv2d(x_eager, w, None, 1, 1)
    numerics.assert_close_to_reference(z, z_eager, zref, dtype=dtype, what="genstats z")
    # Statistics are fp32 sums of the fp32-accumulated conv: judge them against
    # eager's fp32 sums of its own (rounded) z.
    ze = z_eager.float()
    numerics.assert_close_to_reference(s, ze.sum(dim=(0, 2, 3)), zref.sum(dim=(0, 2, 3)), dtype=dtype,
                                       what="genstats sum")
    numerics.assert_close_to_reference(q, (ze * ze).sum(dim=(0, 2, 3)), (zref * zref).sum(dim=(0, 2, 3)),
                                       dtype=dtype, what="genstats sumsq")


@requires_cuda
@GPU
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
def test_dgrad_wgrad(dtype):
    n, c, k, hw = 4, 32, 64, 10
    x = _cl(torch.randn(n, c, hw, hw, device="cuda")).to(dtype)
    w = _cl(torch.randn(k, c, 3, 3, device="cuda") / (9 * c) ** 0.5).to(dtype)
    dy = _cl(torch.randn(n, k, hw // 2, hw // 2, device="cuda")).to(dtype)
    dx = cudnn_conv.conv_dgrad(dy, w, x.shape, 2, 1)
    dw = cudnn_conv.conv_wgrad(dy, x, w.shape, 2, 1)
    ref = torch.ops.aten.convolution_backward(dy.cpu().double(), x.cpu().double(), w.cpu().double(), None,
                                              [2, 2], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])
    eager = torch.ops.aten.convolution_backward(dy, x, w, None, [2, 2], [1, 1], [1, 1], False, [0, 0], 1,
                                                [True, True, False])
    numerics.assert_close_to_reference(dx, eager[0], ref[0], dtype=dtype, kind="grad", what="dgrad")
    numerics.assert_close_to_reference(dw, eager[1], ref[1], dtype=dtype, kind="grad", what="wgrad")


@requires_cuda
@GPU
def test_conv_bias_act_autograd():
    dtype = torch.float16
    x = _cl(torch.randn(2, 16, 8, 8, device="cuda")).to(dtype).requires_grad_()
    w = _cl(torch.randn(32, 16, 3, 3, device="cuda") / 12).to(dtype).requires_grad_()
    b = torch.randn(32, device="cuda", requires_grad=True)
    r = _cl(torch.randn(2, 32, 8, 8, device="cuda")).to(dtype).requires_grad_()
    gy = torch.randn(2, 32, 8, 8, device="cuda").to(dtype)
    y = cudnn_conv.conv_bias_act(x, w, b, r, True, 1, 1)
    y.backward(gy)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, w, b, r)]
    yr = _bias_act_ref(*leaves[:2], leaves[2], leaves[3], True, 1, 1)
    yr.backward(gy.cpu().double())
    le = [t.detach().clone().requires_grad_() for t in (x, w, b, r)]
    ye = torch.relu(F.conv2d(le[0], le[1], le[2].to(dtype), 1, 1) + le[3])
    ye.backward(gy)
    for name, got, eager, ref in zip("xwbr", (x, w, b, r), le, leaves):
        numerics.assert_close_to_reference(got.grad, eager.grad, ref.grad, dtype=dtype, kind="grad",
                                           what=f"d{name}")


@requires_cuda
@GPU
def test_conv_bn_train_matches_batchnorm():
    dtype = torch.float16
    conv = torch.nn.Conv2d(16, 32, 3, padding=1, bias=False).cuda()
    bn = torch.nn.BatchNorm2d(32).cuda().train()
    x = _cl(torch.randn(4, 16, 8, 8, device="cuda"))
    r = _cl(torch.randn(4, 32, 8, 8, device="cuda"))
    bn_ref = torch.nn.BatchNorm2d(32).double().train()
    with torch.no_grad():
        ref = torch.relu(bn_ref(F.conv2d(x.cpu().double(), conv.weight.cpu().double(), None, 1, 1))
                         + r.cpu().double())
        # Eager AMP-style: conv in fp16, BN with fp32 parameters, add + ReLU in fp16.
        z_eager = F.conv2d(x.to(dtype), conv.weight.to(dtype), None, 1, 1)
        eager = torch.relu(F.batch_norm(z_eager, None, None, bn.weight, bn.bias, True, 0.0, bn.eps) + r.to(dtype))
    y, *_ = cudnn_conv.conv_bn_train(x.to(dtype), conv.weight.to(dtype), bn.weight, bn.bias, bn.running_mean,
                                     bn.running_var, bn.num_batches_tracked, bn.momentum, bn.eps,
                                     residual=r.to(dtype), relu=True, padding=1)
    numerics.assert_close_to_reference(y, eager, ref, dtype=dtype, what="conv_bn_train output")
    torch.testing.assert_close(bn.running_mean.cpu().double(), bn_ref.running_mean, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(bn.running_var.cpu().double(), bn_ref.running_var, atol=1e-3, rtol=1e-3)
    assert int(bn.num_batches_tracked) == 1
