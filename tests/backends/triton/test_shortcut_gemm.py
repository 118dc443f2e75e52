"""The projection shortcut as a second GEMM in the block's last conv
(inference): the Triton kernel's HAS_SHORTCUT variant under the interpreter,
the op fused_resnet::conv2d_bias_act_shortcut, the blocks' eval path on
`triton` and its switch, and the AOT compile of the new kernel for sm_80 and
sm_90 with ptxas (no spills).

The tests marked `interpreter` run in the TRITON_INTERPRET=1 child of
tests/interpreter.py. bf16 is never run under the interpreter (its bf16 dots are wrong).
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

import fused_resnet
from fused_resnet import config, numerics
from fused_resnet.nn.paths import units
from fused_resnet.ops import conv2d_bias_act_shortcut, reference
from helpers import count_kernel_launches, find_ptxas, randomise_bn

from interpreter import IN_INTERPRETER  # noqa: E402

# (N, C_in, H, W, C_out, k, stride, padding, C2, H2, W2, stride2): the main
# conv's shape classes (1x1 = MODE_GEMM as in a Bottleneck's conv3; 3x3 with
# thin channels = MODE_FLAT, with >= 32 = MODE_CBLOCK as in a BasicBlock's
# conv2) times shortcut stride 1 and 2 (odd and even H2). The interpreter's
# tiles are 32x16x16, so C_out = 20 spans two column tiles, C2 = 18/20 two K
# steps of the shortcut loop, and M = 2*7*7 four row tiles.
SHAPES = {
    "1x1_sc_s1": (2, 8, 7, 7, 20, 1, 1, 0, 18, 7, 7, 1),
    "1x1_sc_s2_odd": (2, 6, 4, 4, 20, 1, 1, 0, 12, 7, 7, 2),
    "1x1_sc_s2_even": (2, 4, 3, 3, 8, 1, 1, 0, 4, 6, 6, 2),
    "3x3_flat_sc_s2": (2, 12, 5, 5, 12, 3, 1, 1, 6, 9, 9, 2),
    "3x3_cblock_sc_s2": (2, 32, 4, 4, 20, 3, 1, 1, 20, 8, 8, 2),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _problem(shape, dtype, bias=True, seed=0):
    n, ci, h, w, co, k, s, p, c2, h2, w2, s2 = shape
    gen = torch.Generator().manual_seed(seed)
    cl = torch.channels_last
    x = torch.randn(n, ci, h, w, generator=gen).to(dtype).contiguous(memory_format=cl)
    wt = (torch.randn(co, ci, k, k, generator=gen) / (ci * k * k) ** 0.5).to(dtype)
    x2 = torch.randn(n, c2, h2, w2, generator=gen).to(dtype).contiguous(memory_format=cl)
    wt2 = (torch.randn(co, c2, 1, 1, generator=gen) / c2 ** 0.5).to(dtype)
    # fp32 (fp64 for fp64), as the summed folded biases are.
    b = torch.randn(co, generator=gen).to(reference.stat_dtype(dtype)) if bias else None
    return x, wt, b, x2, wt2, s2, dict(stride=s, padding=p)


def _check(y, x, wt, b, x2, wt2, s2, conv, relu, dtype, what):
    """The numerics criterion: error against the fp64 reference at most 2x
    eager's (the same reference in `dtype`) plus the dtype's floor."""
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref = reference.conv2d_bias_act_shortcut(d64(x), d64(wt), d64(b), d64(x2), d64(wt2), s2, relu, **conv)
    eager = reference.conv2d_bias_act_shortcut(x, wt, b, x2, wt2, s2, relu, **conv)
    assert y.dtype == x.dtype and y.shape == ref.shape, (y.dtype, y.shape, ref.shape)
    assert y.is_contiguous(memory_format=torch.channels_last)
    return numerics.assert_close_to_reference(y, eager, ref, dtype=dtype, what=what)


# ------------------------------------------------ interpreter (child process)


def _launch():
    from fused_resnet.backends.triton import launch

    return launch


PLAIN, SHORTCUT = "conv2d_fwd_kernel", "conv2d_fwd_shortcut_kernel"


def _spy_kernels(monkeypatch):
    """Count launches of the two conv kernels (plain and with the shortcut)."""
    return count_kernel_launches(monkeypatch, PLAIN, SHORTCUT)


def _run_kernel(x, wt, b, x2, wt2, s2, conv, relu=True):
    y, s, q = _launch().conv2d_bn_act(x, wt, None, b, None, relu, conv["stride"], conv["padding"], 1, 1, False,
                                      x2=x2, weight2=wt2, stride2=s2)
    assert s.numel() == 0 and q.numel() == 0
    return y


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(SHAPES))
def test_interp_kernel_matches_reference(name, dtype, monkeypatch):
    counts = _spy_kernels(monkeypatch)
    dt = DTYPES[dtype]
    x, wt, b, x2, wt2, s2, conv = _problem(SHAPES[name], dt)
    y = _run_kernel(x, wt, b, x2, wt2, s2, conv)
    assert counts == {PLAIN: 0, SHORTCUT: 1}
    _check(y, x, wt, b, x2, wt2, s2, conv, True, dt, f"{name} {dtype}")


@pytest.mark.interpreter
@pytest.mark.parametrize("relu,bias", [(False, True), (False, False), (True, False)])
def test_interp_epilogue_variants(relu, bias):
    x, wt, b, x2, wt2, s2, conv = _problem(SHAPES["3x3_flat_sc_s2"], torch.float32, bias=bias)
    y = _run_kernel(x, wt, b, x2, wt2, s2, conv, relu=relu)
    _check(y, x, wt, b, x2, wt2, s2, conv, relu, torch.float32, f"relu={relu} bias={bias}")
    if not relu:
        assert (y < 0).any(), "without ReLU some outputs must stay negative"


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["1x1_sc_s2_odd", "3x3_cblock_sc_s2"])
def test_interp_zero_operands_reduce_to_the_plain_kernel_bit_for_bit(name):
    """The shortcut GEMM only adds to the accumulator: with x2 = 0 the result
    is the plain kernel's bit for bit; with the main weight = 0 it is the
    plain kernel run as the 1x1 strided conv of x2 (same K blocking)."""
    x, wt, b, x2, wt2, s2, conv = _problem(SHAPES[name], torch.float32)
    launch = _launch()
    plain = launch.conv2d_bn_act(x, wt, None, b, None, True, conv["stride"], conv["padding"], 1, 1, False)[0]
    got = _run_kernel(x, wt, b, torch.zeros_like(x2), wt2, s2, conv)
    assert torch.equal(got, plain)
    only_sc = launch.conv2d_bn_act(x2, wt2, None, b, None, True, s2, 0, 1, 1, False)[0]
    got = _run_kernel(x, torch.zeros_like(wt), b, x2, wt2, s2, conv)
    assert torch.equal(got, only_sc)
    # ...and neither part alone is the answer.
    both = _run_kernel(x, wt, b, x2, wt2, s2, conv)
    assert not torch.allclose(both, plain) and not torch.allclose(both, only_sc)


@pytest.mark.interpreter
def test_interp_op_dispatch_and_grad_fallback(monkeypatch):
    counts = _spy_kernels(monkeypatch)
    x, wt, b, x2, wt2, s2, conv = _problem(SHAPES["1x1_sc_s2_odd"], torch.float32)
    y = conv2d_bias_act_shortcut(x, wt, b, x2, wt2, s2, True, backend="triton", **conv)
    assert counts[SHORTCUT] == 1
    _check(y, x, wt, b, x2, wt2, s2, conv, True, torch.float32, "op")
    want = reference.conv2d_bias_act_shortcut(x, wt, b, x2, wt2, s2, True, **conv)
    assert torch.equal(conv2d_bias_act_shortcut(x, wt, b, x2, wt2, s2, True, backend="reference", **conv), want)
    # Gradient wanted: the differentiable reference runs, not the kernel.
    leaves = [t.detach().clone().requires_grad_() for t in (x, wt, b, x2, wt2)]
    y = conv2d_bias_act_shortcut(*leaves[:4], leaves[4], s2, True, backend="triton", **conv)
    assert counts[SHORTCUT] == 1 and y.requires_grad
    y.square().sum().backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, wt, b, x2, wt2)]
    reference.conv2d_bias_act_shortcut(*ref_leaves, s2, True, **conv).square().sum().backward()
    for name, a, r in zip(("x", "weight", "bias", "x2", "weight2"), leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.interpreter
def test_interp_bf16_takes_the_reference_path(monkeypatch):
    counts = _spy_kernels(monkeypatch)
    x, wt, b, x2, wt2, s2, conv = _problem(SHAPES["1x1_sc_s1"], torch.bfloat16)
    y = conv2d_bias_act_shortcut(x, wt, b, x2, wt2, s2, True, backend="triton", **conv)
    assert counts == {PLAIN: 0, SHORTCUT: 0}
    assert torch.equal(y, reference.conv2d_bias_act_shortcut(x, wt, b, x2, wt2, s2, True, **conv))


# Blocks: (kind, inplanes, planes, stride), each with a downsample (1x1 conv + BN).
BLOCKS = {
    "bottleneck-s2": ("bottleneck", 8, 4, 2),       # conv3 1x1 (MODE_GEMM) + 1x1 s2 shortcut
    "bottleneck-s1": ("bottleneck", 8, 4, 1),       # channel change only (layer1's first block)
    "basic-s2": ("basic", 6, 12, 2),                # conv2 3x3 (MODE_FLAT) + 1x1 s2 shortcut
    "basic-s2-cblock": ("basic", 16, 32, 2),        # conv2 3x3 (MODE_CBLOCK)
}


def _block(spec, dtype=torch.float32, backend="triton"):
    kind, inplanes, planes, stride = spec
    cls = fused_resnet.FusedBottleneck if kind == "bottleneck" else fused_resnet.FusedBasicBlock
    out = planes * cls.expansion
    torch.manual_seed(0)
    ds = torch.nn.Sequential(torch.nn.Conv2d(inplanes, out, 1, stride, bias=False), torch.nn.BatchNorm2d(out))
    block = cls(inplanes, planes, stride, ds)
    randomise_bn(block)
    block.eval()
    ref = copy.deepcopy(block).double()
    ref.backend = "reference"
    eager = copy.deepcopy(block).to(dtype)
    eager.backend = "reference"
    fused = block.to(dtype).to(memory_format=torch.channels_last)
    fused.backend = backend
    x = torch.randn(2, inplanes, 7, 7).to(dtype).contiguous(memory_format=torch.channels_last)
    return fused, eager, ref, x


def _old_path(block, x):
    """The unfused eval path: downsample unit, then the last unit adding it."""
    unit = units.unit
    out = unit(block.conv1, block.bn1, x, None, True, "triton")
    if hasattr(block, "conv3"):
        out = unit(block.conv2, block.bn2, out, None, True, "triton")
        last = (block.conv3, block.bn3)
    else:
        last = (block.conv2, block.bn2)
    identity = unit(block.downsample[0], block.downsample[1], x, None, False, "triton")
    return unit(*last, out, identity, True, "triton")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(BLOCKS))
def test_interp_block_eval_fuses_the_shortcut(name, dtype, monkeypatch):
    counts = _spy_kernels(monkeypatch)
    dt = DTYPES[dtype]
    fused, eager, ref, x = _block(BLOCKS[name], dt)
    assert fused_resnet.get_fusions()["shortcut_gemm"]
    with torch.no_grad():
        y = fused(x)
        numerics.assert_close_to_reference(y, eager(x), ref(x.double()), dtype=dt, what=f"{name} {dtype}")
    # conv1 [+ conv2] plain, the last conv with the shortcut: no downsample launch.
    n_plain = 2 if BLOCKS[name][0] == "bottleneck" else 1
    assert counts == {PLAIN: n_plain, SHORTCUT: 1}, counts


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["bottleneck-s2", "basic-s2"])
def test_interp_switch_off_gives_the_old_path(name, monkeypatch):
    counts = _spy_kernels(monkeypatch)
    fused, eager, ref, x = _block(BLOCKS[name])
    old = fused_resnet.set_fusions(shortcut_gemm=False)
    try:
        assert old["shortcut_gemm"] is True and not config.fusion("shortcut_gemm")
        with torch.no_grad():
            y_off = fused(x)
            assert counts[SHORTCUT] == 0 and counts[PLAIN] == (4 if name.startswith("bottleneck") else 3)
            assert torch.equal(y_off, _old_path(fused, x))
    finally:
        fused_resnet.set_fusions(**old)
    with torch.no_grad():
        y_on = fused(x)
        numerics.assert_close_to_reference(y_on, eager(x), ref(x.double()), what=name)
        numerics.assert_close_to_reference(y_off, eager(x), ref(x.double()), what=name)
    assert counts[SHORTCUT] == 1


@pytest.mark.interpreter
def test_interp_grad_or_training_take_the_unfused_path(monkeypatch):
    counts = _spy_kernels(monkeypatch)
    fused, eager, ref, x = _block(BLOCKS["bottleneck-s2"])
    # Eval with autograd recording (parameters require grad): no fused op.
    xg = x.clone().requires_grad_()
    y = fused(xg)
    assert counts[SHORTCUT] == 0
    y.sum().backward()
    assert xg.grad is not None and fused.downsample[0].weight.grad is not None
    numerics.assert_close_to_reference(y, eager(x), ref(x.double()), what="eval with grad")
    fused.train()
    fused(x)
    assert counts[SHORTCUT] == 0


@pytest.mark.interpreter
def test_interp_fold_cache_follows_the_downsample(monkeypatch):
    """The combined fold is cached on the last BN but keyed on the
    downsample's tensors too: changing only the downsample's BN statistics
    or weight must change the output."""
    fused, eager, ref, x = _block(BLOCKS["basic-s2"])
    with torch.no_grad():
        fused(x)
        for mod in (fused, eager, ref):
            mod.downsample[1].running_var.mul_(3.0)
            mod.downsample[0].weight.mul_(-1.0)
        numerics.assert_close_to_reference(fused(x), eager(x), ref(x.double()), what="after a downsample change")


@pytest.mark.interpreter
def test_interp_torch_compile_fullgraph_keeps_the_fused_shortcut(monkeypatch):
    counts = _spy_kernels(monkeypatch)
    fused, eager, ref, x = _block(BLOCKS["bottleneck-s2"])
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        y = compiled(x)
        numerics.assert_close_to_reference(y, eager(x), ref(x.double()), what="compiled block")
    assert counts[SHORTCUT] >= 1
    torch._dynamo.reset()


@pytest.mark.interpreter
def test_interp_optimize_on_triton(monkeypatch):
    """optimize() on the triton backend: both downsample blocks of a small
    network take the shortcut GEMM, and the output matches the eval model."""
    counts = _spy_kernels(monkeypatch)
    a, _, _, x = _block(BLOCKS["basic-s2"])
    b, _, _, _ = _block(("bottleneck", 12, 4, 2))
    model = torch.nn.Sequential(a, b).train()
    for m in (a, b):
        m.backend = None
    ref = copy.deepcopy(model).double().eval()
    eager = copy.deepcopy(model).eval()
    for m in list(ref) + list(eager):
        m.backend = "reference"
    x = x.contiguous()  # optimize converts it
    opt = fused_resnet.optimize(model, x, backend="triton")
    assert opt is model and not model.training and a.backend == b.backend == "triton"
    assert a.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert counts[SHORTCUT] == 2
    with torch.no_grad():
        numerics.assert_close_to_reference(opt(x), eager(x), ref(x.double()), what="optimized blocks")
    assert counts[SHORTCUT] == 4



# ------------------------------------------------ the op and the switch (this process)

not_interp = pytest.mark.skipif(IN_INTERPRETER, reason="checks this process's (non-interpreter) paths")


@not_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_op_is_the_reference(dtype):
    x, wt, b, x2, wt2, s2, conv = _problem(SHAPES["3x3_flat_sc_s2"], dtype)
    want = reference.conv2d_bias_act_shortcut(x, wt, b, x2, wt2, s2, True, **conv)
    for backend in (None, "triton", "auto", "reference"):
        y = conv2d_bias_act_shortcut(x, wt, b, x2, wt2, s2, True, backend=backend, **conv)
        assert torch.equal(y, want)
    y = torch.ops.fused_resnet.conv2d_bias_act_shortcut(x, wt, b, x2, wt2, [s2, s2], True, [1, 1], [1, 1],
                                                        [1, 1], 1)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, want)


def test_reference_is_the_folded_block_tail():
    """reference.conv2d_bias_act_shortcut with both BNs folded (fp64) is
    relu(bn3(conv3(out)) + bn_ds(conv_ds(x))), the eager block's tail."""
    from fused_resnet.backends import fold

    fused, _, _, x = _block(BLOCKS["bottleneck-s2"], backend="reference")
    block = copy.deepcopy(fused).double().to(memory_format=torch.contiguous_format)
    x = x.double().contiguous()
    with torch.no_grad():
        out = block.relu(block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))))
        want = torch.relu(block.bn3(block.conv3(out)) + block.downsample(x))
        w, b = fold.fold_keep_bias(block.conv3, block.bn3)
        w2, b2 = fold.fold_keep_bias(block.downsample[0], block.downsample[1])
        got = reference.conv2d_bias_act_shortcut(out, w, b + b2, x, w2, 2, True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_opcheck():
    x, wt, b, x2, wt2, s2, conv = _problem(SHAPES["1x1_sc_s2_odd"], torch.float32)
    torch.library.opcheck(torch.ops.fused_resnet.conv2d_bias_act_shortcut.default,
                          (x, wt, b, x2, wt2, [s2, s2], True, [1, 1], [0, 0], [1, 1], 1))


def test_gradcheck_through_the_fallback():
    x, wt, b, x2, wt2, s2, conv = _problem((1, 3, 4, 4, 2, 3, 1, 1, 2, 7, 7, 2), torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, wt, b, x2, wt2))
    torch.autograd.gradcheck(lambda *a: conv2d_bias_act_shortcut(*a[:4], a[4], s2, True, **conv), inputs)


def test_bad_arguments_name_the_argument():
    x, wt, b, x2, wt2, s2, conv = _problem(SHAPES["1x1_sc_s2_odd"], torch.float32)
    call = lambda **kw: conv2d_bias_act_shortcut(**{**dict(  # noqa: E731
        x=x, weight=wt, bias=b, x2=x2, weight2=wt2, stride2=s2), **kw})
    with pytest.raises(ValueError, match="`weight2`"):
        call(weight2=wt2[:, :-1])
    with pytest.raises(ValueError, match="shortcut of `x2`"):
        call(stride2=1)
    with pytest.raises(ValueError, match="shortcut of `x2`"):
        call(x2=x2[:1])
    with pytest.raises(TypeError, match="`x2`"):
        call(x2=x2.double())
    with pytest.raises(ValueError, match="`x2` and `weight2` must be 4-D"):
        call(x2=x2[0])
    with pytest.raises(ValueError, match="`bias`"):
        call(bias=b[:-1])
    with pytest.raises(ValueError, match="`stride2`"):
        call(stride2=(1, 2, 3))
    with pytest.raises(fused_resnet.BackendError):
        conv2d_bias_act_shortcut(x, wt, b, x2, wt2, s2, backend="tritn")


def test_launcher_refuses_statistics_with_the_shortcut():
    pytest.importorskip("triton")
    from fused_resnet.backends.triton import launch

    x, wt, b, x2, wt2, s2, conv = _problem(SHAPES["1x1_sc_s2_odd"], torch.float32)
    with pytest.raises(ValueError, match="inference-only"):
        launch.conv2d_bn_act(x, wt, None, b, None, True, 1, 0, 1, 1, True, x2=x2, weight2=wt2, stride2=s2)
    with pytest.raises(ValueError, match="both `x2` and `weight2`"):
        launch.conv2d_bn_act(x, wt, None, b, None, True, 1, 0, 1, 1, False, x2=x2)


def test_set_fusions_and_the_environment():
    old = fused_resnet.set_fusions(shortcut_gemm=False)
    off = dict(old, shortcut_gemm=False)
    try:
        assert fused_resnet.get_fusions() == off == config.get("fusions")
        assert fused_resnet.set_fusions(shortcut_gemm=True) == off
        with pytest.raises(ValueError, match="unknown fusion 'prologue_bn'"):
            fused_resnet.set_fusions(prologue_bn=True)
        with pytest.raises(TypeError, match="True or False"):
            fused_resnet.set_fusions(shortcut_gemm=1)
    finally:
        fused_resnet.set_fusions(**old)
    defaults = {"shortcut_gemm": True, "prologue": False, "prologue_dgrad": True}

    def from_env(text):
        config.load_environment({} if text is None else {"FUSED_RESNET_FUSIONS": text})
        return config.get_fusions()

    assert from_env(None) == defaults
    assert from_env("shortcut_gemm=0") == dict(defaults, shortcut_gemm=False)
    assert from_env(" Shortcut_GEMM = off ,prologue=on") == dict(defaults, shortcut_gemm=False, prologue=True)
    with pytest.warns(RuntimeWarning, match="ignoring .FUSED_RESNET_FUSIONS='bogus=1,shortcut_gemm=0'"):
        assert from_env("bogus=1,shortcut_gemm=0") == defaults
    env = dict(os.environ, FUSED_RESNET_FUSIONS="shortcut_gemm=0")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", "import fused_resnet; print(fused_resnet.get_fusions())"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "'shortcut_gemm': False" in out.stdout, out.stdout + out.stderr


@not_interp
def test_cpu_backend_never_takes_the_shortcut_op(monkeypatch):
    """On CPU tensors without the interpreter the blocks run oneDNN's units as
    before, switch on or off."""
    import fused_resnet.ops as ops_pkg

    def boom(*a, **k):
        raise AssertionError("the shortcut op must not run on the cpu backend")

    monkeypatch.setattr(ops_pkg, "conv2d_bias_act_shortcut", boom)
    fused, eager, ref, x = _block(BLOCKS["bottleneck-s2"], backend=None)
    with torch.no_grad():
        numerics.assert_close_to_reference(fused(x), eager(x), ref(x.double()), what="cpu backend")


# ------------------------------------------------ AOT compile for sm_80 / sm_90 (ptxas)

ARCHS = {80: ("sm_80", 163 * 1024), 90: ("sm_90a", 227 * 1024)}
REGISTERS_PER_SM = 65536
_INT_ARGS = ("M H W C_in OH OW C_out CIN_G COUT_G stride_h stride_w pad_h pad_w dil_h dil_w "
             "H2 W2 C2 stride2_h stride2_w").split()
_PTR_ARGS = "x_ptr w_ptr y_ptr scale_ptr shift_ptr res_ptr psum_ptr psumsq_ptr x2_ptr w2_ptr".split()
_CONSTEXPRS = ("KH KW MODE HAS_SCALE HAS_SHIFT HAS_RESIDUAL RELU EMIT_STATS INPUT_PRECISION "
               "BLOCK_M BLOCK_N BLOCK_K GROUP_M").split()
# As Triton's launcher marks ResNet channel counts (see test_triton_aot.py):
# the pipelined (cp.async / TMA-free wgmma) kernel that actually runs.
_DIVISIBLE = set(_PTR_ARGS) | {"C_in", "C_out", "CIN_G", "COUT_G", "C2"}



def _aot_jobs(arch: int) -> list[dict]:
    """Every config the launcher can pick on `arch`, with the heaviest
    epilogue it can launch alongside the shortcut (scale, shift, residual,
    ReLU; never statistics), one variant each to stay within the time budget:
    16-bit configs as bf16 in MODE_FLAT, fp32 configs with TF32 dots in
    MODE_CBLOCK. A survey of every config in MODE_GEMM, MODE_CBLOCK and
    MODE_FLAT (bf16, fp16) found these the most register-hungry or tied
    (sm_90 bf16: FLAT 96-217 registers, CBLOCK 96-205, GEMM 64-196; fp32
    CBLOCK up to 240, no spills anywhere)."""
    from fused_resnet.backends.triton import conv_configs
    from fused_resnet.backends.triton.conv2d_fwd import MODE_CBLOCK, MODE_FLAT

    jobs = []
    for itemsize, cfg in conv_configs.all_configs(arch):
        dtype, mode = ("bf16", MODE_FLAT) if itemsize == 2 else ("fp32", MODE_CBLOCK)
        jobs.append(dict(arch=arch, cfg=cfg, dtype=dtype, mode=mode, k=3,
                         label=f"sm{arch} {cfg.name} {dtype} mode{mode} shortcut"))
    return jobs


def _aot_compile_one(job: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fused_resnet.backends.triton.conv2d_fwd import conv2d_fwd_shortcut_kernel as kernel

    cfg, dt = job["cfg"], job["dtype"]
    sig = {n: "*fp32" for n in _PTR_ARGS}
    sig.update({n: f"*{dt}" for n in ("x_ptr", "w_ptr", "y_ptr", "res_ptr", "x2_ptr", "w2_ptr")})
    sig.update({n: "i32" for n in _INT_ARGS})
    sig.update({n: "constexpr" for n in _CONSTEXPRS})
    names = list(kernel.arg_names)
    sig = {n: sig[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in _DIVISIBLE}
    consts = dict(KH=job["k"], KW=job["k"], MODE=job["mode"], INPUT_PRECISION="tf32", HAS_SCALE=True, HAS_SHIFT=True,
                  HAS_RESIDUAL=True, RELU=True, EMIT_STATS=False, **cfg.meta())
    ck = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                        target=GPUTarget("cuda", job["arch"], 32),
                        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    ptx_text = ck.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(ptx_text)
        proc = subprocess.run([job["ptxas"], "-v", f"-arch={ARCHS[job['arch']][0]}", ptx, "-o", os.devnull],
                              capture_output=True, text=True)
    report = proc.stderr
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    # Two GEMMs in the PTX: two sets of MMA instructions (wgmma on sm_90,
    # mma.sync on sm_80), i.e. the shortcut loop was not optimised away.
    mma = len(re.findall(r"\bwgmma\.mma_async|\bmma\.sync", ptx_text))
    return dict(label=job["label"], rc=proc.returncode, report=report, shared=int(ck.metadata.shared),
                regs=int(regs.group(1)) if regs else None, spill_stores=int(spills.group(1)) if spills else None,
                threads=32 * cfg.num_warps, mma=mma)


@pytest.fixture(scope="module")
def aot_results():
    """Compile every job of both archs in one pool of spawned workers (fork
    after torch is loaded is unsafe; each worker's start costs an import)."""
    pytest.importorskip("triton")
    ptxas = find_ptxas()
    if ptxas is None:
        pytest.skip("ptxas not found (CUDA_HOME/bin, PATH, or triton's bundled copy)")
    jobs = [dict(j, ptxas=ptxas) for arch in sorted(ARCHS) for j in _aot_jobs(arch)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_aot_compile_one, jobs))
    return {arch: [r for j, r in zip(jobs, results) if j["arch"] == arch] for arch in ARCHS}


@pytest.mark.slow
@not_interp
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_shortcut_kernel_compiles_without_spills(arch, aot_results):
    results = aot_results[arch]
    assert results
    limit = ARCHS[arch][1]
    failures = []
    for r in results:
        print(f"{r['label']:52s} regs {r['regs']} spill-stores {r['spill_stores']} shared {r['shared']}")
        if r["rc"] != 0 or r["regs"] is None or r["spill_stores"] is None:
            failures.append(f"{r['label']}: ptxas failed or gave no report:\n{r['report']}")
        elif r["spill_stores"] > 0:
            failures.append(f"{r['label']}: {r['spill_stores']} bytes of spill stores ({r['regs']} registers)")
        elif r["shared"] > limit:
            failures.append(f"{r['label']}: {r['shared']} bytes of shared memory > {limit}")
        elif r["regs"] * r["threads"] > REGISTERS_PER_SM:
            failures.append(f"{r['label']}: {r['regs']} registers x {r['threads']} threads exceed one SM")
        elif r["mma"] == 0:
            failures.append(f"{r['label']}: no MMA instructions in the PTX")
    assert not failures, "the shortcut kernel fails on these configs:\n" + "\n".join(failures)


