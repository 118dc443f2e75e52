"""fused_resnet::conv2d_bn_act: the Triton conv under the interpreter, and the
op's CPU (aten) path, autograd, fake kernel, torch.compile and autotune cache.

The tests marked `interpreter` run the Triton kernels on CPU tensors under
Triton's interpreter, in the one TRITON_INTERPRET=1 child that
tests/interpreter.py starts for the whole run.
"""

from __future__ import annotations

import itertools
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import fused_resnet
from fused_resnet import numerics
from fused_resnet.ops import conv2d_bn_act, reference

from interpreter import IN_INTERPRETER  # noqa: E402
# The test_interp_* functions are removed from this module outside the
# interpreter (see the end of the file), so they are neither run nor reported
# as skipped there; this marker is a second guard.

# (N, C_in, H, W, C_out, k, stride, padding, dilation, groups): every shape
# class the kernel distinguishes; C not a multiple of 16 and odd H/W throughout.
SHAPES = {
    "1x1": (2, 24, 5, 7, 20, 1, 1, 0, 1, 1),            # MODE_GEMM
    "1x1_s2": (2, 40, 7, 7, 24, 1, 2, 0, 1, 1),         # channel blocks, one tap
    "3x3_s1": (2, 40, 6, 5, 24, 3, 1, 1, 1, 1),         # channel blocks, 3 K blocks per tap
    "3x3_s2_n1": (1, 36, 7, 9, 18, 3, 2, 1, 1, 1),
    "3x3_thin_cin": (2, 8, 6, 6, 20, 3, 1, 1, 1, 1),    # flat K across taps
    "stem_7x7_s2": (1, 3, 11, 13, 16, 7, 2, 3, 1, 1),   # C_in = 3
    "grouped_cin4": (2, 32, 5, 5, 32, 3, 1, 1, 1, 8),   # ResNeXt-like thin groups
    "grouped_cin32": (1, 64, 5, 5, 48, 3, 2, 1, 1, 2),
    "dilated": (1, 32, 9, 9, 16, 3, 1, 2, 2, 1),
}


def _problem(shape, dtype, scale=True, shift=True, residual=True, seed=0):
    n, ci, h, w, co, k, s, p, d, g = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ci, h, w, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(co, ci // g, k, k, generator=gen) / (ci // g * k * k) ** 0.5).to(dtype)
    oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
    ow = (w + 2 * p - d * (k - 1) - 1) // s + 1
    pdt = reference.stat_dtype(dtype)  # scale/shift are fp32 (fp64 for fp64), as BN makes them
    sc = (torch.rand(co, generator=gen) + 0.5).to(pdt) if scale else None
    sf = torch.randn(co, generator=gen).to(pdt) if shift else None
    r = torch.randn(n, co, oh, ow, generator=gen).to(dtype) if residual else None
    return x, wt, sc, sf, r, dict(stride=s, padding=p, dilation=d, groups=g)


def _check(out, x, wt, sc, sf, r, relu, stats, conv, dtype, what):
    """Judge (y, sum, sumsq) by the numerics criterion: error against the fp64
    reference at most 2x eager's error in `dtype` plus the dtype's floor."""
    y, s, q = out
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref = reference.conv2d_bn_act(d64(x), d64(wt), d64(sc), d64(sf), d64(r), relu, emit_stats=stats, **conv)
    eager = reference.conv2d_bn_act(x, wt, sc, sf, r, relu, emit_stats=stats, **conv)
    assert y.dtype == x.dtype and y.shape == ref[0].shape
    assert y.is_contiguous(memory_format=torch.channels_last)
    numerics.assert_close_to_reference(y, eager[0], ref[0], dtype=dtype, what=f"{what}: y")
    if stats:
        assert s.dtype == torch.float32 and s.shape == (wt.shape[0],)
        # The kernel sums the fp32 accumulator, eager sums z rounded to dtype:
        # judged against fp64 with fp32's floor scaled by the sums' size.
        numerics.assert_close_to_reference(s, eager[1], ref[1], dtype=torch.float32, what=f"{what}: sum")
        numerics.assert_close_to_reference(q, eager[2], ref[2], dtype=torch.float32, what=f"{what}: sumsq")
    else:
        assert s.numel() == 0 and q.numel() == 0


# ------------------------------------------------ interpreter (child process)


def _launch():
    from fused_resnet.backends.triton import launch

    return launch


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_interp_shape_classes_all_epilogues(name, dtype):
    x, wt, sc, sf, r, conv = _problem(SHAPES[name], dtype)
    out = _launch().conv2d_bn_act(x, wt, sc, sf, r, True, conv["stride"], conv["padding"], conv["dilation"],
                                  conv["groups"], True)
    _check(out, x, wt, sc, sf, r, True, True, conv, dtype, name)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", list(SHAPES))
def test_interp_shape_classes_plain_conv(name):
    x, wt, _, _, _, conv = _problem(SHAPES[name], torch.float32, scale=False, shift=False, residual=False)
    out = _launch().conv2d_bn_act(x, wt, None, None, None, False, conv["stride"], conv["padding"],
                                  conv["dilation"], conv["groups"], False)
    _check(out, x, wt, None, None, None, False, False, conv, torch.float32, name)
    torch.testing.assert_close(out[0], F.conv2d(x, wt, None, **conv), rtol=1e-5, atol=1e-5)


EPILOGUES = list(itertools.product([False, True], repeat=5))


@pytest.mark.interpreter
@pytest.mark.parametrize("flags", EPILOGUES, ids=lambda f: "".join("SBRLT"[i] if v else "-" for i, v in enumerate(f)))
def test_interp_every_epilogue_combination(flags):
    has_scale, has_shift, has_res, relu, stats = flags
    x, wt, sc, sf, r, conv = _problem(SHAPES["3x3_s1"], torch.float32, has_scale, has_shift, has_res)
    out = _launch().conv2d_bn_act(x, wt, sc, sf, r, relu, conv["stride"], conv["padding"], conv["dilation"],
                                  conv["groups"], stats)
    _check(out, x, wt, sc, sf, r, relu, stats, conv, torch.float32, str(flags))


@pytest.mark.interpreter
def test_interp_op_runs_triton_and_backward(monkeypatch):
    """Through the public op: the Triton kernel runs (not the aten path), and
    gradients of every input match eager autograd of the reference."""
    launch = _launch()
    calls = []
    real = launch.conv2d_bn_act
    monkeypatch.setattr(launch, "conv2d_bn_act", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, wt, sc, sf, r, conv = _problem(SHAPES["3x3_s2_n1"], torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in (x, wt, sc, sf, r)]
    y, s, q = conv2d_bn_act(*leaves, relu=True, emit_stats=True, backend="triton", **conv)
    assert calls, "the Triton launcher did not run"
    (y.square().sum() + (s * 0.3).sum() + (q * 0.01).sum()).backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, wt, sc, sf, r)]
    yr, sr, qr = reference.conv2d_bn_act(*ref_leaves, relu=True, emit_stats=True, **conv)
    (yr.square().sum() + (sr * 0.3).sum() + (qr * 0.01).sum()).backward()
    for name, a, b in zip(("x", "weight", "scale", "shift", "residual"), leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.interpreter
def test_interp_bf16_never_reaches_the_interpreter():
    # bf16 tl.dot is wrong under the interpreter, so the op must take the aten path.
    x, wt, sc, sf, r, conv = _problem(SHAPES["1x1"], torch.bfloat16)
    y, _, _ = conv2d_bn_act(x, wt, sc, sf, r, relu=True, backend="triton", **conv)
    want = reference.conv2d_bn_act(x, wt, sc, sf, r, True, **conv)[0]
    assert torch.equal(y, want)



# ------------------------------------------------ the op without Triton (this process)

HEAVY = dict(relu=True, emit_stats=True)


def _op(x, wt, sc, sf, r, relu, conv, stats):
    return torch.ops.fused_resnet.conv2d_bn_act(x, wt, sc, sf, r, relu, [conv["stride"]] * 2,
                                                [conv["padding"]] * 2, [conv["dilation"]] * 2, conv["groups"], stats)


@pytest.mark.skipif(IN_INTERPRETER, reason="checks the path taken without the interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_tensor_takes_the_aten_path(dtype):
    x, wt, sc, sf, r, conv = _problem(SHAPES["3x3_s2_n1"], dtype)
    for backend in (None, "triton", "auto", "reference"):
        y, s, q = conv2d_bn_act(x, wt, sc, sf, r, backend=backend, **HEAVY, **conv)
        want = reference.conv2d_bn_act(x, wt, sc, sf, r, True, emit_stats=True, **conv)
        assert torch.equal(y, want[0]) and torch.equal(s, want[1]) and torch.equal(q, want[2])
    y, s, q = _op(x, wt, sc, sf, r, True, conv, True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, want[0]) and torch.equal(s, want[1])


@pytest.mark.parametrize("stats", [False, True])
def test_opcheck(stats):
    x, wt, sc, sf, r, conv = _problem(SHAPES["grouped_cin32"], torch.float32)
    for t in (x, wt, sc, sf, r):
        t.requires_grad_(True)
    args = (x, wt, sc, sf, r, True, [2, 2], [1, 1], [1, 1], 2, stats)
    torch.library.opcheck(torch.ops.fused_resnet.conv2d_bn_act.default, args)


def test_gradcheck_through_every_input_and_the_statistics():
    x, wt, sc, sf, r, conv = _problem((1, 4, 5, 4, 3, 3, 2, 1, 1, 1), torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, wt, sc, sf, r))

    def f(*a):
        y, s, q = _op(*a, True, conv, True)
        return y, s, q

    torch.autograd.gradcheck(f, inputs)
    # Only y used: the statistics' gradients arrive as None (not materialised).
    torch.autograd.gradcheck(lambda *a: f(*a)[0], inputs)


def test_grad_without_epilogue_params_matches_conv():
    x, wt, _, _, _, conv = _problem(SHAPES["dilated"], torch.float32, False, False, False)
    a, b = x.clone().requires_grad_(), wt.clone().requires_grad_()
    y, _, _ = _op(a, b, None, None, None, False, conv, False)
    y.sum().backward()
    a2, b2 = x.clone().requires_grad_(), wt.clone().requires_grad_()
    F.conv2d(a2, b2, None, **conv).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_torch_compile_fullgraph_traces_the_op():
    x, wt, sc, sf, r, conv = _problem(SHAPES["1x1"], torch.float32)

    def block(x, wt, sc, sf, r):
        y, s, q = _op(x, wt, sc, sf, r, True, conv, True)
        return y * 2, s + q

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, wt, sc, sf, r), block(x, wt, sc, sf, r)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_bad_arguments_name_the_argument():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="`stride`"):
        conv2d_bn_act(x, torch.randn(2, 4, 3, 3), stride=(1, 2, 3))
    with pytest.raises(ValueError, match="`groups`"):
        conv2d_bn_act(x, torch.randn(2, 4, 3, 3), groups=0)
    from fused_resnet import BackendError

    with pytest.raises(BackendError, match="unknown backend"):
        conv2d_bn_act(x, torch.randn(2, 4, 3, 3), backend="tritn")


# ------------------------------------------------ configs and the autotune cache


def test_config_lists_and_buckets():
    from fused_resnet.backends.triton import conv_configs as cc

    for arch in (80, 90):
        for itemsize in (2, 4):
            for cout_g in (4, 64):
                cands = cc.candidates(arch, itemsize, cout_g)
                assert cands and len({c.name for c in cands}) == len(cands)
                assert all(c.block_k * itemsize <= 128 for c in cands)
    assert cc.arch_family((8, 6)) == 80 and cc.arch_family((9, 0)) == 90 and cc.arch_family((10, 0)) == 90
    # A new batch size within the same power of two reuses the tuned result;
    # a different channel count does not.
    b = lambda m, ci=64: cc.shape_bucket(m, ci, 64, 3, 3, (1, 1), (1, 1), 1, "plain")  # noqa: E731
    assert b(200 * 56 * 56) == b(256 * 56 * 56) != b(512 * 56 * 56)
    assert b(1000) == b(1024) != b(1025)
    assert b(256 * 56 * 56) != b(256 * 56 * 56, ci=128)


def test_autotune_cache_roundtrip_and_corruption(tmp_path):
    from fused_resnet.backends.triton import autotune_cache as ac

    path = tmp_path / "sub" / "autotune-test.json"
    c = ac.AutotuneCache(path)
    key = ac.make_key(90, "bfloat16-tf32", "M1024-Ci64-Co64", "v-test")
    assert c.get(key) is None
    c.put(key, "m128n128k64g8w8s4")
    assert ac.AutotuneCache(path).get(key) == "m128n128k64g8w8s4"
    assert json.loads(path.read_text())["entries"][key] == "m128n128k64g8w8s4"

    for garbage in ("{not json", '["a list"]', '{"format": 999, "entries": {}}', "\x00\xff"):
        path.write_text(garbage)
        with pytest.warns(RuntimeWarning, match="ignoring unreadable autotune cache"):
            assert ac.AutotuneCache(path).get(key) is None
    fresh = ac.AutotuneCache(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh.put(key, "m64n64k64g8w4s4")  # a corrupt file is replaced, not fatal
    assert ac.AutotuneCache(path).get(key) == "m64n64k64g8w4s4"


def test_unwritable_cache_warns_and_keeps_working(tmp_path):
    from fused_resnet.backends.triton import autotune_cache as ac

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    c = ac.AutotuneCache(blocker / "autotune.json")
    with pytest.warns(RuntimeWarning, match="cannot write autotune cache"):
        c.put("k", "cfg")
    assert c.get("k") == "cfg"


def test_choose_config_uses_cache_and_retunes_unknown_names(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    fused_resnet.set_cache_dir(tmp_path)
    from fused_resnet.backends.triton import autotune_cache as ac
    from fused_resnet.backends.triton import conv_configs as cc
    from fused_resnet.backends.triton import launch
    from fused_resnet.backends.triton.conv2d_fwd import KERNEL_VERSION

    cands = cc.candidates(90, 2, 64)
    timed = []
    fake_times = {c.name: 1.0 + i for i, c in enumerate(cands)}
    fake_times[cands[2].name] = 0.5
    fused_resnet.set_autotune(True)  # tests/conftest.py turns it off
    monkeypatch.setattr(launch, "_benchmark", lambda run, cfg: timed.append(cfg.name) or fake_times[cfg.name])
    monkeypatch.setattr(launch, "_chosen", {})
    key = ac.make_key(90, "bfloat16-tf32", "bucket-a", KERNEL_VERSION)
    assert launch.choose_config(key, cands, None) == cands[2] and len(timed) == len(cands)
    launch._chosen.clear()
    timed.clear()
    assert launch.choose_config(key, cands, None) == cands[2] and not timed  # from disk

    ac.get_cache(KERNEL_VERSION).put(key + "-x", "m1n1k1g1w1s1")
    with pytest.warns(RuntimeWarning, match="unknown config"):
        assert launch.choose_config(key + "-x", cands, None) == cands[2]
    assert len(timed) == len(cands)



def test_autotune_off_takes_the_first_candidate_untimed(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    fused_resnet.set_cache_dir(tmp_path)
    fused_resnet.set_autotune(False)
    from fused_resnet.backends.triton import autotune_cache as ac
    from fused_resnet.backends.triton import conv_configs as cc
    from fused_resnet.backends.triton import launch
    from fused_resnet.backends.triton.conv2d_fwd import KERNEL_VERSION

    def never(run, cfg):
        raise AssertionError("timed a config with autotuning off")

    monkeypatch.setattr(launch, "_benchmark", never)
    monkeypatch.setattr(launch, "_chosen", {})
    cands = cc.candidates(90, 2, 64)
    key = ac.make_key(90, "bfloat16-tf32", "bucket-off", KERNEL_VERSION)
    assert launch.choose_config(key, cands, None) == cands[0]
    # Nothing remembered: turning autotuning on later tunes this key.
    assert key not in launch._chosen and ac.get_cache(KERNEL_VERSION).get(key) is None
    fused_resnet.set_autotune(True)
    monkeypatch.setattr(launch, "_benchmark", lambda run, cfg: 0.5 if cfg == cands[-1] else 1.0)
    assert launch.choose_config(key, cands, None) == cands[-1]
    with pytest.raises(TypeError, match="`enabled` must be True or False"):
        fused_resnet.set_autotune("yes")


def test_the_tuning_flag_is_set_only_while_timing(monkeypatch):
    """launch.tuning() (which kernel-launch counters read) is on inside
    _benchmark's timed runs, off after them, also when a config fails."""
    pytest.importorskip("triton")
    import triton

    from fused_resnet.backends.triton import launch

    seen = []

    def fake_do_bench(fn, warmup, rep):
        fn()
        return 1.0

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    cfg = type("Cfg", (), {"name": "fake"})()
    assert launch._benchmark(lambda c: seen.append(launch.tuning()), cfg) == 1.0
    assert seen == [True] and not launch.tuning()

    def failing(c):
        raise RuntimeError("out of resources")

    with pytest.warns(RuntimeWarning, match="failed to run"):
        assert launch._benchmark(failing, cfg) == float("inf")
    assert not launch.tuning()

    def oom(c):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):  # the problem's size, not the config's fault
        launch._benchmark(oom, cfg)
    assert not launch.tuning()


