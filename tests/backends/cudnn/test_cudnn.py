"""The cudnn backend (csrc/cudnn/, fused_resnet/backends/cudnn/).

Without a GPU: the graph key, the build-once cache (a multi-threaded C++
self-test), the fake kernels, the availability reporting, the backward of
conv_genstats (its math against torch.autograd in fp64, and its registered
autograd through a test-only CPU kernel of the op) and the blocks' cudnn
training path wired through it. With a GPU: every graph against the fp64
reference under the numerics criterion, that the fused graph (not the aten
fallback) ran where cuDNN should accept it, cache hits, the autograd of
conv_bias_act and conv_genstats, and cudnn-trained blocks against the
reference backend.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import fused_resnet
from fused_resnet import _compat, dispatch, numerics
from fused_resnet.backends import bn_modules
from fused_resnet.backends.cudnn import units as cudnn_units
from fused_resnet.backends.cudnn import graphs as cudnn_graphs
from fused_resnet.nn.paths import units as paths_units

from helpers import requires_cuda
from helpers import randomise_bn

requires_build = pytest.mark.skipif(
    not cudnn_graphs.built(), reason=f"cudnn backend not built: {dispatch.availability()['cudnn'].reason}")


# ---- without a GPU ------------------------------------------------------------


def test_availability_reports_the_build_and_the_device():
    av = dispatch.availability()["cudnn"]
    if not cudnn_graphs.built():
        assert not av.available and "not built" in av.reason
    elif not torch.cuda.is_available():
        assert not av.available and "no GPU" in av.reason
    else:
        assert av.available


def test_auto_never_selects_cudnn():
    # Until a recorded GPU run shows it correct at ResNet-50 shapes (issue 10).
    assert dispatch.resolve("auto", torch.device("cuda")) != "cudnn"
    assert dispatch.resolve("auto", torch.device("cpu")) != "cudnn"


def _key(variant, tensors, params=(1, 1, 0, 0, 1, 1, 1)):
    return cudnn_graphs.graph_key(variant, tensors, params)


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
    cudnn_graphs.clear_cache()
    stats = cudnn_graphs.cache_stats()
    assert stats == {"entries": 0, "hits": 0, "builds": 0, "refusals": 0}
    assert cudnn_graphs.fallbacks() == []


@pytest.mark.skipif(not cudnn_graphs._schemas_defined(), reason="fused_resnet._C predates the cudnn schemas")
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
    y = cudnn_graphs.conv_bias_act(x, w, b, r, relu=True, padding=1)
    torch.testing.assert_close(y, torch.relu(F.conv2d(x, w, b, padding=1) + r))
    z, s, q = cudnn_graphs.conv_genstats(x, w, padding=1)
    torch.testing.assert_close(s.double(), z.sum(dim=(0, 2, 3)))
    torch.testing.assert_close(q.double(), (z * z).sum(dim=(0, 2, 3)))


# ---- conv_genstats's backward, without a GPU ------------------------------------


def _genstats_ref(x, w, sc, sh, relu, stride, padding, dilation, groups):
    """The op's contract in plain differentiable PyTorch."""
    inp = x
    if sc is not None:
        inp = x * sc.view(1, -1, 1, 1) + sh.view(1, -1, 1, 1)
        if relu:
            inp = torch.relu(inp)
    z = F.conv2d(inp, w, None, stride, padding, dilation, groups)
    return z, z.sum(dim=(0, 2, 3)), (z * z).sum(dim=(0, 2, 3))


# (N, C, K, H=W, kernel, stride, padding, dilation, groups)
GENSTATS_SHAPES = [
    (2, 4, 6, 7, 3, 1, 1, 1, 1),
    (3, 6, 4, 8, 3, 2, 1, 1, 2),
    (2, 5, 7, 6, 1, 1, 0, 1, 1),
    (2, 8, 8, 9, 1, 2, 0, 1, 4),
    (2, 3, 5, 7, 3, 2, 0, 1, 1),
    (1, 4, 4, 10, 3, 1, 2, 2, 1),
]
PROLOGUES = {"identity": (False, False), "affine": (True, False), "affine-relu": (True, True)}
GRAD_SETS = [("dz",), ("dz", "dsum"), ("dz", "dsumsq"), ("dz", "dsum", "dsumsq"), ("dsum", "dsumsq"), ("dsumsq",)]


def _genstats_case(shape, prologue, dtype=torch.float64, channels_last=False):
    n, c, k, hw, ks, stride, pad, dil, groups = shape
    x = torch.randn(n, c, hw, hw, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(k, c // groups, ks, ks, dtype=dtype) / (c // groups * ks * ks) ** 0.5
    affine, relu = PROLOGUES[prologue]
    # Scales of both signs; shifts that put about half of the ReLU's inputs below 0.
    sc = torch.randn(c, dtype=dtype) if affine else None
    sh = 0.3 * torch.randn(c, dtype=dtype) if affine else None
    return x, w, sc, sh, relu, dict(stride=stride, padding=pad, dilation=dil, groups=groups)


def _autograd_ref(x, w, sc, sh, relu, conv, grads):
    """torch.autograd of _genstats_ref: (dx, dw, dsc, dsh) for grads =
    {"dz": ..., "dsum": ..., "dsumsq": ...} (absent keys: output unused)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, sc, sh)]
    outs = _genstats_ref(*leaves, relu, conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    names = ("dz", "dsum", "dsumsq")
    used = [(o, grads[nm]) for o, nm in zip(outs, names) if nm in grads]
    inputs = [t for t in leaves if t is not None]
    got = torch.autograd.grad([o for o, _ in used], inputs, [g for _, g in used], allow_unused=True)
    it = iter(got)
    return [next(it) if t is not None else None for t in leaves]


def _random_grads(z, names):
    k = z.shape[1]
    pool = {"dz": torch.randn_like(z), "dsum": torch.randn(k, dtype=z.dtype), "dsumsq": torch.randn(k, dtype=z.dtype)}
    return {nm: pool[nm] for nm in names}


@pytest.mark.parametrize("shape", GENSTATS_SHAPES, ids=lambda s: "n{}c{}k{}hw{}k{}s{}p{}d{}g{}".format(*s))
@pytest.mark.parametrize("prologue", list(PROLOGUES))
@pytest.mark.parametrize("grad_set", GRAD_SETS, ids="+".join)
def test_genstats_backward_matches_autograd(shape, prologue, grad_set):
    x, w, sc, sh, relu, conv = _genstats_case(shape, prologue)
    z, _, _ = cudnn_graphs.conv_genstats(x, w, sc, sh, relu, **conv)
    grads = _random_grads(z, grad_set)
    want = _autograd_ref(x, w, sc, sh, relu, conv, grads)
    got = cudnn_graphs._genstats_backward(
        x, w, sc, sh, relu, conv["stride"], conv["padding"], conv["dilation"], conv["groups"], z,
        grads.get("dz"), grads.get("dsum"), grads.get("dsumsq"))
    for name, g, r in zip(("x", "weight", "in_scale", "in_shift"), got, want):
        if r is None:
            assert g is None, f"d{name}: expected no gradient"
            continue
        assert g is not None and g.shape == r.shape and g.dtype == r.dtype, f"d{name}"
        torch.testing.assert_close(g, r, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("channels_last", [False, True])
def test_genstats_backward_computes_only_what_is_needed(channels_last):
    x, w, sc, sh, relu, conv = _genstats_case(GENSTATS_SHAPES[1], "affine-relu", channels_last=channels_last)
    z, _, _ = cudnn_graphs.conv_genstats(x, w, sc, sh, relu, **conv)
    grads = _random_grads(z, ("dz", "dsumsq"))
    want = _autograd_ref(x, w, sc, sh, relu, conv, grads)
    args = (x, w, sc, sh, relu, conv["stride"], conv["padding"], conv["dilation"], conv["groups"], z,
            grads["dz"], None, grads["dsumsq"])
    for needs in [(False, True, False, False), (False, False, True, False), (True, False, False, True)]:
        got = cudnn_graphs._genstats_backward(*args, needs_input_grad=needs)
        for need, g, r in zip(needs, got, want):
            if need:
                torch.testing.assert_close(g, r)
            else:
                assert g is None
    assert cudnn_graphs._genstats_backward(*args[:10], None, None, None) == (None, None, None, None)


@pytest.fixture
def genstats_cpu_kernel():
    """A CPU kernel for fused_resnet::cudnn_conv_genstats (test-only, removed
    afterwards), so the op's registered autograd runs on CPU tensors: the
    kernel computes the contract, the backward is the one CUDA uses."""
    if not cudnn_graphs._schemas_defined():
        pytest.skip("fused_resnet._C predates the cudnn schemas")
    if _compat.dispatcher_has_kernel("fused_resnet::cudnn_conv_genstats", "CPU"):
        pytest.skip("the op already has a CPU kernel")

    def kernel(x, weight, in_scale, in_shift, in_relu, stride, padding, dilation, groups):
        z, s, q = _genstats_ref(x, weight, in_scale, in_shift, in_relu, stride, padding, dilation, groups)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        zf = z.to(acc)
        return z.contiguous(memory_format=torch.channels_last), zf.sum(dim=(0, 2, 3)), (zf * zf).sum(dim=(0, 2, 3))

    lib = torch.library.Library("fused_resnet", "IMPL")
    lib.impl("cudnn_conv_genstats", kernel, "CPU")
    try:
        yield torch.ops.fused_resnet.cudnn_conv_genstats
    finally:
        lib._destroy()


def _op_args(conv):
    pair = lambda v: [v, v]  # noqa: E731
    return pair(conv["stride"]), pair(conv["padding"]), pair(conv["dilation"]), conv["groups"]


@pytest.mark.parametrize("shape", [GENSTATS_SHAPES[0], GENSTATS_SHAPES[3]], ids=["3x3", "1x1-s2-g4"])
@pytest.mark.parametrize("prologue", list(PROLOGUES))
@pytest.mark.parametrize("grad_set", [("dz",), ("dz", "dsum", "dsumsq"), ("dsum",)], ids="+".join)
def test_genstats_registered_autograd(genstats_cpu_kernel, shape, prologue, grad_set):
    x, w, sc, sh, relu, conv = _genstats_case(shape, prologue)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, sc, sh)]
    z, s, q = genstats_cpu_kernel(*leaves, relu, *_op_args(conv))
    grads = _random_grads(z.detach(), grad_set)
    loss = sum((out * grads[nm]).sum() for out, nm in zip((z, s, q), ("dz", "dsum", "dsumsq")) if nm in grads)
    loss.backward()
    want = _autograd_ref(x, w, sc, sh, relu, conv, grads)
    for name, leaf, r in zip(("x", "weight", "in_scale", "in_shift"), leaves, want):
        if leaf is None:
            continue
        assert leaf.grad is not None, f"no gradient for {name}"
        torch.testing.assert_close(leaf.grad, r, msg=lambda m: f"d{name}: {m}")


def test_genstats_opcheck(genstats_cpu_kernel):
    # Schema, fake kernel and autograd registration against the (CPU) kernel.
    x, w, sc, sh, relu, conv = _genstats_case(GENSTATS_SHAPES[1], "affine-relu", dtype=torch.float32)
    args = (x.requires_grad_(), w.requires_grad_(), sc.requires_grad_(), sh.requires_grad_(), relu,
            *_op_args(conv))
    torch.library.opcheck(genstats_cpu_kernel.default, args)


def test_stats_from_sums_gives_batch_mean_and_biased_var():
    z = torch.randn(3, 5, 4, 6, dtype=torch.float64) * 2 + torch.randn(1, 5, 1, 1, dtype=torch.float64)
    shift = torch.randn(5, dtype=torch.float64)
    s, ss = z.sum(dim=(0, 2, 3)), (z * z).sum(dim=(0, 2, 3))
    mean, var = bn_modules.stats_from_sums(z, s, ss, shift)
    torch.testing.assert_close(mean, z.mean(dim=(0, 2, 3)) + shift)
    torch.testing.assert_close(var, z.var(dim=(0, 2, 3), unbiased=False))
    m32, v32 = bn_modules.stats_from_sums(z.float(), s.float(), ss.float())
    assert m32.dtype == v32.dtype == torch.float32
    torch.testing.assert_close(v32.double(), z.var(dim=(0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-5)
    # A constant channel: rounding must not make the variance negative.
    zc = torch.full((2, 1, 3, 3), 0.1, dtype=torch.float32)
    _, vc = bn_modules.stats_from_sums(zc, zc.sum(dim=(0, 2, 3)), (zc * zc).sum(dim=(0, 2, 3)))
    assert (vc >= 0).all()


def test_cudnn_training_is_gated_to_what_the_graph_runs():
    conv = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False)
    assert cudnn_units._genstats_operands(conv, torch.randn(2, 4, 5, 5)) is None  # CPU tensor
    if torch.cuda.is_available() and cudnn_graphs.built():
        conv = conv.cuda()
        x = torch.randn(2, 4, 5, 5, device="cuda")
        assert cudnn_units._genstats_operands(conv, x) is not None
        assert cudnn_units._genstats_operands(conv, x[:0]) is None
        assert cudnn_units._genstats_operands(conv.double(), x.double()) is None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            xa, wa = cudnn_units._genstats_operands(conv.float(), x)
        assert xa.dtype == wa.dtype == torch.bfloat16
        biased = torch.nn.Conv2d(4, 8, 3, padding=1, bias=True).cuda()
        assert cudnn_units._genstats_operands(biased, x) is None


# (kind, inplanes, planes, stride, groups, base_width, dilation), as tests/nn/test_fused_blocks.py
CUDNN_BLOCKS = [
    ("basic", 16, 16, 1, 1, 64, 1),
    ("basic-downsample", 16, 32, 2, 1, 64, 1),
    ("bottleneck-downsample", 32, 16, 2, 1, 64, 1),
    ("bottleneck-grouped", 64, 16, 1, 4, 8, 1),
    ("bottleneck-dilated", 64, 16, 1, 1, 64, 2),
]


def _cudnn_block_trio(kind, inplanes, planes, stride, groups, base_width, dilation, fused_backend):
    """(fused block on `fused_backend`, the same block on backend "reference",
    fp64 CPU copy of the reference), identical weights and buffers."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    tv_cls = BasicBlock if kind.startswith("basic") else Bottleneck
    torch.manual_seed(0)
    ds = None
    if stride != 1 or inplanes != planes * tv_cls.expansion:
        ds = torch.nn.Sequential(torch.nn.Conv2d(inplanes, planes * tv_cls.expansion, 1, stride, bias=False),
                                 torch.nn.BatchNorm2d(planes * tv_cls.expansion))
    tv = tv_cls(inplanes, planes, stride, ds, groups, base_width, dilation)
    randomise_bn(tv)
    ref = copy.deepcopy(tv).double()
    fused = fused_resnet.convert(copy.deepcopy(tv), backend=fused_backend)
    eager = fused_resnet.convert(copy.deepcopy(tv), backend="reference")
    return fused, eager, ref


def _compare_blocks(fused, eager, ref, x, dtype, what, autocast_dtype=None):
    """Train-mode forward + backward of the three blocks from x; output,
    input gradient, every parameter gradient and every buffer under the
    numerics criterion (elementwise: one block, identical inputs)."""
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_(), x.detach().cpu().double().requires_grad_()]
    ys = []
    for m, xi in zip((fused, eager, ref), xs):
        m.train()
        with torch.autocast(xi.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None and xi.device.type == "cuda"):
            ys.append(m(xi))
    assert ys[0].dtype == ys[1].dtype
    numerics.assert_close_to_reference(*ys, dtype=dtype, what=f"{what}: output")
    g = torch.randn(ys[2].shape, dtype=torch.float64)
    for y in ys:
        y.backward(g.to(y.device, y.dtype))
    numerics.assert_close_to_reference(*[t.grad for t in xs], dtype=dtype, kind="grad", what=f"{what}: input grad")
    for (name, pf), (_, pe), (_, pr) in zip(fused.named_parameters(), eager.named_parameters(),
                                            ref.named_parameters()):
        assert pf.grad is not None, f"{what}: no gradient for {name}"
        numerics.assert_close_to_reference(pf.grad, pe.grad, pr.grad, dtype=dtype, kind="grad",
                                           what=f"{what}: grad of {name}")
    for (name, bf), (_, be), (_, br) in zip(fused.named_buffers(), eager.named_buffers(), ref.named_buffers()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(bf.cpu(), be.cpu()), f"{what}: {name}"
        else:
            numerics.assert_close_to_reference(bf, be, br, dtype=dtype, what=f"{what}: {name}")


def _n_convs(block):
    return sum(isinstance(m, torch.nn.Conv2d) for m in block.modules())


@pytest.mark.parametrize("spec", CUDNN_BLOCKS, ids=[b[0] for b in CUDNN_BLOCKS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cudnn_training_path_wiring_on_cpu(monkeypatch, genstats_cpu_kernel, spec, dtype):
    """The blocks' cudnn training branch (genstats sums -> batch_norm_act's
    batch_mean/batch_var, backward through the op's registered autograd) on
    CPU: the gate is opened for CPU tensors and conv_genstats calls the op
    (with the test-only CPU kernel) directly."""
    calls = []

    def genstats_via_op(x, w, sc, sh, relu, stride, padding, dilation, groups):
        calls.append(tuple(x.shape))
        return genstats_cpu_kernel(x, w, sc, sh, relu, list(stride), list(padding), list(dilation), groups)

    monkeypatch.setattr(cudnn_units, "_genstats_operands",
                        lambda conv, x: None if conv.bias is not None else (x, conv.weight))
    monkeypatch.setattr(cudnn_graphs, "conv_genstats", genstats_via_op)
    fused, eager, ref = _cudnn_block_trio(*spec, fused_backend=None)
    fused.to(dtype, memory_format=torch.channels_last)
    eager.to(dtype, memory_format=torch.channels_last)
    # Run the blocks' cudnn path directly: on a CPU-only machine the backend
    # name itself cannot be chosen, and the table has no CPU entry for it.
    resolve = paths_units.resolve  # `eager` (backend "reference") keeps its own
    monkeypatch.setattr(paths_units, "resolve", lambda choice, *a: "cudnn" if choice is None else resolve(choice, *a))
    monkeypatch.setitem(dispatch.TABLE, ("train_conv", "cudnn", "cpu"), dispatch.TABLE[("train_conv", "cudnn", "cuda")])
    x = torch.randn(3, spec[1], 9, 9, dtype=dtype).contiguous(memory_format=torch.channels_last)
    _compare_blocks(fused, eager, ref, x, dtype, f"{spec[0]} {dtype} (cudnn path on CPU)")
    assert len(calls) == _n_convs(fused), "not every conv went through conv_genstats"


# ---- with a GPU ---------------------------------------------------------------

GPU = pytest.mark.skipif(not (torch.cuda.is_available() and cudnn_graphs.built()),
                         reason="needs a CUDA GPU and the cudnn backend built")
FUSED_DTYPES = [torch.float16, torch.bfloat16]


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _new_fallbacks(before):
    return cudnn_graphs.fallbacks()[len(before):]


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
    before = cudnn_graphs.fallbacks()
    y = cudnn_graphs.conv_bias_act(x, w, b, r, relu, stride, pad)
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
    cudnn_graphs.conv_bias_act(x, w, None, None, True, 1, 1)
    s0 = cudnn_graphs.cache_stats()
    cudnn_graphs.conv_bias_act(x, w, None, None, True, 1, 1)
    s1 = cudnn_graphs.cache_stats()
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
    before = cudnn_graphs.fallbacks()
    z, s, q = cudnn_graphs.conv_genstats(x, w, sc, sh, prologue, 1, 1)
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
    dx = cudnn_graphs.conv_dgrad(dy, w, x.shape, 2, 1)
    dw = cudnn_graphs.conv_wgrad(dy, x, w.shape, 2, 1)
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
    y = cudnn_graphs.conv_bias_act(x, w, b, r, True, 1, 1)
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
    y, *_ = cudnn_graphs.conv_bn_train(x.to(dtype), conv.weight.to(dtype), bn.weight, bn.bias, bn.running_mean,
                                     bn.running_var, bn.num_batches_tracked, bn.momentum, bn.eps,
                                     residual=r.to(dtype), relu=True, padding=1)
    numerics.assert_close_to_reference(y, eager, ref, dtype=dtype, what="conv_bn_train output")
    torch.testing.assert_close(bn.running_mean.cpu().double(), bn_ref.running_mean, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(bn.running_var.cpu().double(), bn_ref.running_var, atol=1e-3, rtol=1e-3)
    assert int(bn.num_batches_tracked) == 1


@requires_cuda
@GPU
@pytest.mark.parametrize("dtype", FUSED_DTYPES + [torch.float32])
@pytest.mark.parametrize("prologue", ["identity", "affine-relu"])
@pytest.mark.parametrize("grad_set", [("dz",), ("dz", "dsum", "dsumsq")], ids="+".join)
def test_conv_genstats_autograd(dtype, prologue, grad_set):
    """The op's registered backward on CUDA against torch.autograd of the
    reference: fp64 on the CPU (ground truth) and eager in `dtype` (the bound)."""
    n, c, k, hw = 4, 32, 64, 10
    affine, relu = PROLOGUES[prologue]
    x = _cl(torch.randn(n, c, hw, hw, device="cuda")).to(dtype)
    w = _cl(torch.randn(k, c, 3, 3, device="cuda") / (9 * c) ** 0.5).to(dtype)
    sc = torch.randn(c, device="cuda") if affine else None
    sh = 0.3 * torch.randn(c, device="cuda") if affine else None
    gz = _cl(torch.randn(n, k, hw // 2, hw // 2, device="cuda")).to(dtype)
    gs, gq = torch.randn(k, device="cuda"), 0.1 * torch.randn(k, device="cuda")
    pool = {"dz": gz, "dsum": gs, "dsumsq": gq}

    def run(leaves, fn):
        z, s, q = fn(*leaves)
        loss = sum((out.double() * pool[nm].to(out.device, torch.float64)).sum()
                   for out, nm in zip((z, s, q), ("dz", "dsum", "dsumsq")) if nm in grad_set)
        loss.backward()
        return [t.grad if t is not None else None for t in leaves]

    def leaves_of(device=None, dt=None):
        return [None if t is None else t.detach().to(device or t.device, dt or t.dtype).requires_grad_()
                for t in (x, w, sc, sh)]

    got = run(leaves_of(), lambda *a: cudnn_graphs.conv_genstats(*a, relu, 2, 1))
    ref = run(leaves_of("cpu", torch.float64), lambda *a: _genstats_ref(*a, relu, 2, 1, 1, 1))

    def eager_fn(xe, we, sce, she):
        inp = xe
        if sce is not None:
            inp = xe.float() * sce.view(1, -1, 1, 1) + she.view(1, -1, 1, 1)
            inp = (torch.relu(inp) if relu else inp).to(dtype)
        z = F.conv2d(inp, we, None, 2, 1)
        zf = z.float()
        return z, zf.sum(dim=(0, 2, 3)), (zf * zf).sum(dim=(0, 2, 3))

    eager = run(leaves_of(), eager_fn)
    for name, g, e, r in zip(("x", "weight", "in_scale", "in_shift"), got, eager, ref):
        if r is None:
            continue
        assert g is not None, f"no gradient for {name}"
        numerics.assert_close_to_reference(g, e, r, dtype=dtype, kind="grad",
                                           what=f"genstats d{name} {dtype} {prologue} {grad_set}")


@requires_cuda
@GPU
@pytest.mark.parametrize("spec", CUDNN_BLOCKS, ids=[b[0] for b in CUDNN_BLOCKS])
@pytest.mark.parametrize("mode", ["fp32", "bf16-autocast"])
def test_cudnn_blocks_train_like_the_reference_backend(monkeypatch, spec, mode):
    """FusedBasicBlock / FusedBottleneck training on backend "cudnn"
    (channels_last) against the same block on backend "reference": output,
    input gradient, parameter gradients and running statistics, elementwise
    under the numerics criterion; every conv through conv_genstats."""
    calls = []
    real = cudnn_graphs.conv_genstats

    def spy(*a, **kw):
        calls.append(a[0].dtype)
        return real(*a, **kw)

    monkeypatch.setattr(cudnn_graphs, "conv_genstats", spy)
    autocast_dtype = torch.bfloat16 if mode == "bf16-autocast" else None
    dtype = autocast_dtype or torch.float32
    fused, eager, ref = _cudnn_block_trio(*spec, fused_backend="cudnn")
    for m in (fused, eager):
        m.to("cuda", memory_format=torch.channels_last)
    x = _cl(torch.randn(4, spec[1], 10, 10, device="cuda"))
    _compare_blocks(fused, eager, ref, x, dtype, f"{spec[0]} {mode}", autocast_dtype=autocast_dtype)
    assert len(calls) == _n_convs(fused), "not every conv went through conv_genstats"
    assert all(dt == dtype for dt in calls)
