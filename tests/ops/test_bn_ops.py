"""The four BatchNorm ops (bn_stats, bn_finalize, bn_apply, bn_backward):
against their plain-PyTorch references, opcheck, bad inputs, determinism."""

import pytest
import torch

from fused_resnet import numerics, dispatch
from fused_resnet.ops import bn_apply, bn_backward, bn_finalize, bn_stats, reference

pytestmark = pytest.mark.skipif(not dispatch.native_loaded(), reason="fused_resnet._C not built")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (shape, channels_last): C not a multiple of 8, H*W = 1, a long plane.
# C = 1100 channels_last spans three channel tiles of the CPU reductions, the
# last one ending in a partial vector.
SHAPES = [((2, 5, 7, 3), False), ((2, 5, 7, 3), True), ((3, 19, 1, 1), False), ((1, 24, 9, 9), True),
          ((2, 3, 100, 100), False), ((2, 1100, 3, 5), True)]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
ops = torch.ops.fused_resnet


def _z(shape, cl, dtype, device, scale=3.0, shift=1.0):
    z = (torch.randn(shape, device=device) * scale + shift).to(dtype)
    return z.to(memory_format=torch.channels_last) if cl else z


def _close(a, b, tol, what):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True, msg=what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,cl", SHAPES)
def test_pipeline_matches_reference(devices, dtype, shape, cl):
    """stats -> finalize -> apply -> backward, each against reference.py on
    the same inputs (the stats in the statistics' precision; y and dz within
    one rounding of the output dtype)."""
    for device in devices:
        z = _z(shape, cl, dtype, device)
        r = torch.randn(shape, device=device).to(dtype)
        C = shape[1]
        m, v = bn_stats(z)
        mr, vr = reference.bn_stats(z)
        assert m.dtype == reference.stat_dtype(dtype) and m.shape == (C,)
        _close(m, mr, TOL[dtype], "mean")
        _close(v, vr, TOL[dtype] * 10, "var")
        w, b = torch.randn(C, device=device), torch.randn(C, device=device)
        count = z.numel() // C
        sc, sh, inv = bn_finalize(m, v, count, w.to(m.dtype), b.to(m.dtype), None, None, None, 0.1, 1e-5)
        scr, shr, invr = reference.bn_finalize(m, v, count, w.to(m.dtype), b.to(m.dtype), None, None, None, 0.1, 1e-5)
        for a, e, n in ((sc, scr, "scale"), (sh, shr, "shift"), (inv, invr, "invstd")):
            _close(a, e, TOL[dtype], n)
        y, mask = bn_apply(z, sc, sh, r, True)
        yr, maskr = reference.bn_apply(z, sc, sh, r, True)
        fmt = reference.memory_format_of(z)
        assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
        ulp = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        _close(y, yr, ulp * 8, "y")
        # The mask may differ only where y rounds differently at 0.
        diff = reference.unpack_mask(mask, z, fmt) ^ reference.unpack_mask(maskr, z, fmt)
        assert not (diff & (yr.abs() > ulp * 8)).any(), "mask bits differ away from 0"
        dy = torch.randn(shape, device=device).to(dtype)
        for batch_stats in (True, False):
            out = bn_backward(dy, z, maskr, m, inv, w, batch_stats, True)
            ref = reference.bn_backward(dy, z, maskr, m, inv, w, batch_stats, True)
            assert out[0].is_contiguous(memory_format=fmt) and out[0].dtype == dtype
            scale_ = max(1.0, float(ref[0].double().abs().max()))
            _close(out[0], ref[0], ulp * 8 * scale_, "dz")
            assert torch.equal(out[1], ref[1]), "dresidual is the masked dy, exactly"
            _close(out[2], ref[2], TOL[dtype] * 100 * max(1.0, float(ref[2].abs().max())), "dweight")
            _close(out[3], ref[3], TOL[dtype] * 100 * max(1.0, float(ref[3].abs().max())), "dbias")


def test_apply_variants(devices):
    """No residual, no ReLU, a residual in another dtype and layout, out_dtype."""
    for device in devices:
        z = _z((2, 6, 5, 5), True, torch.float32, device)
        sc, sh = torch.randn(6, device=device), torch.randn(6, device=device)
        r = torch.randn(2, 6, 5, 5, device=device, dtype=torch.float64)  # contiguous, fp64
        for res in (None, r):
            for relu in (False, True):
                for odt in (None, torch.bfloat16):
                    y, mask = bn_apply(z, sc, sh, res, relu, odt)
                    yr, maskr = reference.bn_apply(z, sc, sh, res, relu, odt)
                    assert y.dtype == yr.dtype and mask.numel() == maskr.numel()
                    _close(y, yr, 1e-5 if odt is None else 1e-2, f"y res={res is not None} relu={relu} {odt}")
                    assert torch.equal(mask, maskr)


def test_stats_large_mean_small_variance(devices):
    for device in devices:
        for cl in (False, True):
            z = _z((4, 8, 30, 30), cl, torch.float32, device, scale=1e-2, shift=1e4)
            m, v = bn_stats(z)
            m64, v64 = reference.bn_stats(z.double())
            assert ((v.double() - v64) / v64).abs().max() < 1e-3, (v, v64)
            assert (m.double() - m64).abs().max() < 1e-3
            # torch's own fp32 statistics for comparison: ours are no worse than 2x.
            v_eager = torch.var_mean(z, dim=(0, 2, 3), correction=0)[0]
            assert (v.double() - v64).abs().max() <= 2 * (v_eager.double() - v64).abs().max() + 1e-9


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("shape", [(4, 64, 32, 32), (2, 40, 13, 11), (8, 96, 7, 7)])
def test_stats_as_accurate_as_eagers_batch_norm_when_the_spread_dwarfs_the_mean(cl, shape):
    # eager's CPU batch_norm accumulates fp32 statistics in double, so its
    # batch mean is within an ulp of the exact one even when the values are
    # 1e9 times larger than the mean; an fp32 deviation pass rounds each
    # value's deviation by eps/2 x the spread and misses it by ~1e-5.
    dims = (0, 2, 3)
    z64 = torch.randn(shape, dtype=torch.float64) * 1e4
    z = (z64 - z64.mean(dims, keepdim=True)).float()  # a mean ~1e-5 under a spread of 1e4
    if cl:
        z = z.contiguous(memory_format=torch.channels_last)
    m, v = bn_stats(z)
    m64, v64 = reference.bn_stats(z.double())
    rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
    torch.nn.functional.batch_norm(z, rm, rv, training=True, momentum=1.0)
    n = z.numel() // shape[1]
    numerics.assert_close_to_reference(m, rm, m64, what="batch mean")
    numerics.assert_close_to_reference(v, rv * (n - 1) / n, v64, what="batch variance")


def test_stats_nan_inf_and_empty(devices):
    for device in devices:
        z = torch.randn(2, 3, 4, 4, device=device)
        z[0, 1, 0, 0] = float("nan")
        z[1, 2, 1, 1] = float("inf")
        m, v = bn_stats(z)
        mr, vr = reference.bn_stats(z)
        _close(m, mr, 1e-5, "mean")
        _close(v, vr, 1e-5, "var")
        m, v = bn_stats(z[:0])
        assert m.shape == (3,) and torch.isnan(m).all() and torch.isnan(v).all()


@pytest.mark.parametrize("shape", [(2, 40, 13, 11), (1, 1030, 9, 8), (4, 64, 128, 128)],
                         ids=["chunks+tail", "wide-rows", "streamed-over-16MiB"])
def test_stats_channels_last_paths_with_outliers_and_nonfinite(devices, shape):
    """The rows-layout statistics (channels_last): the tiled path (whole
    vector chunks plus tail channels, several row tiles; rows over 4 KiB apart)
    and the streamed path for tensors over 16 MiB. A large mean with a small
    spread whose first value, the per-channel shift, is an outlier; then
    Inf/NaN in some channels only, which must not touch the others."""
    for device in devices:
        z = _z(shape, True, torch.float32, device, scale=1e-2, shift=1e4)
        z[0, :, 0, 0] += 50.0  # the first value of every channel: 5000 standard deviations off
        m, v = bn_stats(z)
        m64, v64 = reference.bn_stats(z.double())
        assert (m.double() - m64).abs().max() < 1e-3
        # A fixed fp32 bound (~80 ulp): eager's own F.batch_norm statistics
        # are far worse on such data (relative errors of 1e-4 to 50 measured
        # on these shapes), so "within 2x of eager" would prove nothing here.
        assert ((v.double() - v64) / v64).abs().max() < 1e-5
        C = shape[1]
        z[1 % shape[0], 3, 2, 1] = float("inf")
        z[0, C - 1, 1, 2] = float("nan")
        m, v = bn_stats(z)
        mr, vr = reference.bn_stats(z.double())
        _close(m, mr, 1e-3, "mean with Inf/NaN")
        _close(v, vr, 1e-3, "var with Inf/NaN")
        assert torch.isinf(m[3]) and torch.isnan(v[3]) and torch.isnan(m[C - 1])


def test_deterministic(devices):
    for device in devices:
        z = _z((4, 16, 33, 33), True, torch.float32, device)
        first = bn_stats(z)
        dy = torch.randn_like(z)
        mask = bn_apply(z, torch.ones(16, device=device), torch.zeros(16, device=device), None, True)[1]
        b1 = bn_backward(dy, z, mask, first[0], first[1], None, True, False)
        for _ in range(3):
            again = bn_stats(z)
            assert all(torch.equal(a, b) for a, b in zip(first, again))
            b2 = bn_backward(dy, z, mask, first[0], first[1], None, True, False)
            assert all(torch.equal(a, b) for a, b in zip(b1, b2))


@pytest.mark.parametrize("momentum", [0.1, None, 1.0])
def test_finalize_running_stats(devices, momentum):
    for device in devices:
        C = 5
        m, v = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
        states = []
        for impl in (bn_finalize, reference.bn_finalize):
            torch.manual_seed(1)
            rm, rv = torch.randn(C, device=device), torch.rand(C, device=device) + 1
            nbt = torch.tensor(3, device=device)
            outs = impl(m, v, 10, torch.randn(C, device=device), None, rm, rv, nbt, momentum, 1e-3)
            states.append((outs, rm, rv, nbt))
        (o1, rm1, rv1, n1), (o2, rm2, rv2, n2) = states
        assert int(n1) == int(n2) == 4
        for a, b in zip(o1 + (rm1, rv1), o2 + (rm2, rv2)):
            _close(a, b, 1e-6, "finalize")
        # track_running_stats=False: nothing to update, nothing to count.
        sc, sh, inv = bn_finalize(m, v, 10, None, None, None, None, None, momentum, 1e-3)
        _close(inv, torch.rsqrt(v + 1e-3), 1e-6, "invstd")
        _close(sh, -m * inv, 1e-6, "shift")


def _opcheck_args(device, requires_grad):
    z = _z((2, 5, 4, 3), True, torch.float32, device)
    C = 5
    sc, sh = torch.randn(C, device=device), torch.randn(C, device=device)
    r = torch.randn(2, 5, 4, 3, device=device)
    for t in (z, sc, sh, r):
        t.requires_grad_(requires_grad)
    return z, sc, sh, r


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(devices, requires_grad):
    for device in devices:
        z, sc, sh, r = _opcheck_args(device, requires_grad)
        torch.library.opcheck(ops.bn_stats.default, (z,))
        torch.library.opcheck(ops.bn_apply.default, (z, sc, sh, r, True))
        torch.library.opcheck(ops.bn_apply.default, (z, sc, sh, None, False, torch.float64))
        m, v = ops.bn_stats(z.detach())
        C = z.shape[1]
        finalize_args = (m.clone().requires_grad_(requires_grad), v.clone(), 24, sc, sh, torch.zeros(C, device=device),
                         torch.ones(C, device=device), torch.tensor(0, device=device), 0.1, 1e-5)
        # A mutating op has no autograd formula (PyTorch forbids one), so
        # skip the autograd-registration check when inputs require grad.
        tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
        kw = {"test_utils": tests} if requires_grad else {}
        torch.library.opcheck(ops.bn_finalize.default, finalize_args, **kw)
        _, mask = ops.bn_apply(z.detach(), sc.detach(), sh.detach(), None, True)
        dy = torch.randn_like(z).requires_grad_(requires_grad)
        bw_tests = ("test_schema", "test_autograd_registration", "test_faketensor")
        kw = {"test_utils": bw_tests} if requires_grad else {}
        torch.library.opcheck(ops.bn_backward.default, (dy, z, mask, m, v, sc, True, True), **kw)


def test_apply_gradcheck():
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    sc = torch.randn(3, dtype=torch.float64, requires_grad=True)
    sh = torch.randn(3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda *a: ops.bn_apply(*a, True)[0], (z, sc, sh, r))
    torch.autograd.gradcheck(lambda a: ops.bn_stats(a), (z,))


def test_bad_inputs_name_the_argument():
    z = torch.randn(2, 3, 4, 4)
    c3 = torch.ones(3)
    with pytest.raises(RuntimeError, match="`z` must be float32"):
        ops.bn_stats(z.int())
    with pytest.raises(RuntimeError, match="`z` must have at least 2 dims"):
        ops.bn_stats(torch.randn(5))
    with pytest.raises(RuntimeError, match="`scale` must be a 1-D tensor of C=3"):
        ops.bn_apply(z, torch.ones(4), c3, None, True)
    with pytest.raises(RuntimeError, match="`residual` has shape"):
        ops.bn_apply(z, c3, c3, torch.randn(2, 3, 4, 5), True)
    with pytest.raises(RuntimeError, match="`var` has dtype"):
        ops.bn_finalize(c3, c3.double(), 4, None, None, None, None, None, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="`running_var` must be a 1-D tensor of C=3"):
        ops.bn_finalize(c3, c3, 4, None, None, torch.zeros(3), torch.zeros(2), None, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="`mask` must be empty"):
        ops.bn_backward(z, z, torch.zeros(3, dtype=torch.uint8), c3, c3, None, True, False)
    with pytest.raises(RuntimeError, match="`dy` has shape"):
        ops.bn_backward(z[:1], z, torch.zeros(0, dtype=torch.uint8), c3, c3, None, True, False)
    with pytest.raises(RuntimeError, match="`mask` must be uint8"):
        ops.bn_backward(z, z, torch.zeros(0), c3, c3, None, True, False)


@pytest.mark.cuda
def test_wrong_device_named():
    z = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="scale"):
        ops.bn_apply(z, torch.ones(3, device="cuda"), torch.ones(3), None, True)
