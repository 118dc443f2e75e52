"""bn_backward_reduce + bn_backward_elemt, the halves of bn_backward that
synchronised BatchNorm runs around its all-reduce: against the reference,
against bn_backward itself (with this process's sums and count they ARE
bn_backward), opcheck and bad inputs."""

import pytest
import torch

from fused_resnet import dispatch
from fused_resnet.ops import bn_backward, bn_backward_elemt, bn_backward_reduce, bn_stats, reference

pytestmark = pytest.mark.skipif(not dispatch.native_loaded(), reason="fused_resnet._C not built")

ops = torch.ops.fused_resnet
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [((2, 5, 7, 3), False), ((2, 5, 7, 3), True), ((3, 19, 1, 1), False), ((1, 24, 9, 9), True),
          ((2, 16, 8, 8), True), ((2, 1100, 3, 5), True)]
# Relative tolerance of the sums (statistics dtype) and of dz (one rounding of z's dtype, a few ulps).
SUM_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
OUT_TOL = {torch.float64: 1e-11, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _inputs(shape, cl, dtype, device, relu=True):
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(shape, generator=gen) * 2 + 1).to(device, dtype)
    dy = torch.randn(shape, generator=gen).to(device, dtype)
    if cl:
        z, dy = z.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    mean, var = bn_stats(z)
    invstd = (var + 1e-5).rsqrt()
    w = torch.randn(shape[1], generator=gen).to(device, mean.dtype)
    keep = torch.rand(shape, generator=gen).to(device) > 0.4
    mask = reference.pack_mask(keep, reference.memory_format_of(z)) if relu else torch.empty(0, dtype=torch.uint8,
                                                                                              device=device)
    return dy, z, mask, mean, invstd, w


def _close(a, b, tol, what):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, msg=what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,cl", SHAPES)
@pytest.mark.parametrize("relu", [True, False])
def test_split_halves_match_reference_and_bn_backward(devices, dtype, shape, cl, relu):
    for device in devices:
        dy, z, mask, mean, invstd, w = _inputs(shape, cl, dtype, device, relu)
        s_dy, s_dyx = bn_backward_reduce(dy, z, mask, mean, invstd)
        r_dy, r_dyx = reference.bn_backward_reduce(dy, z, mask, mean, invstd)
        scale = dy.double().abs().sum() / shape[1]  # sums are compared relative to their magnitude
        _close(s_dy / scale, r_dy / scale, SUM_TOL[dtype], "sum_dy")
        _close(s_dyx / scale, r_dyx / scale, SUM_TOL[dtype], "sum_dy_xhat")
        count = z.numel() // shape[1]
        dz, dres = bn_backward_elemt(dy, z, mask, mean, invstd, w, s_dy, s_dyx, count, True)
        dzr, dresr = reference.bn_backward_elemt(dy, z, mask, mean, invstd, w, s_dy, s_dyx, count, True)
        fmt = reference.memory_format_of(z)
        assert dz.dtype == dtype and dz.is_contiguous(memory_format=fmt)
        _close(dz, dzr, OUT_TOL[dtype] * max(1.0, dzr.double().abs().max().item()), "dz vs reference")
        assert torch.equal(dres, dresr), "dresidual is dy masked, exactly"
        # With this process's own sums and count the halves are bn_backward.
        full = bn_backward(dy, z, mask, mean, invstd, w, True, True)
        _close(dz, full[0], OUT_TOL[dtype] * max(1.0, full[0].double().abs().max().item()), "dz vs bn_backward")
        assert torch.equal(dres, full[1])
        _close(s_dyx, full[2], SUM_TOL[dtype] * 10, "sum_dy_xhat vs dweight")
        _close(s_dy, full[3], SUM_TOL[dtype] * 10, "sum_dy vs dbias")


def test_elemt_uses_the_given_global_sums_and_count():
    """Sums and count from a bigger (other processes') batch change dz as the
    formula says: scaling both sums and the count by k leaves dz unchanged,
    while changing the count alone changes it."""
    dy, z, mask, mean, invstd, w = _inputs((2, 6, 5, 5), False, torch.float64, "cpu")
    s_dy, s_dyx = bn_backward_reduce(dy, z, mask, mean, invstd)
    count = z.numel() // 6
    dz1, _ = bn_backward_elemt(dy, z, mask, mean, invstd, w, s_dy, s_dyx, count, False)
    dz3, _ = bn_backward_elemt(dy, z, mask, mean, invstd, w, 3 * s_dy, 3 * s_dyx, 3 * count, False)
    torch.testing.assert_close(dz1, dz3, rtol=1e-12, atol=1e-12)
    dz_other, _ = bn_backward_elemt(dy, z, mask, mean, invstd, w, s_dy, s_dyx, 3 * count, False)
    assert not torch.allclose(dz1, dz_other)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(devices, requires_grad):
    for device in devices:
        dy, z, mask, mean, invstd, w = _inputs((2, 5, 4, 3), True, torch.float32, device)
        for t in (dy, z, w):
            t.requires_grad_(requires_grad)
        tests = ("test_schema", "test_autograd_registration", "test_faketensor")
        kw = {"test_utils": tests} if requires_grad else {}
        torch.library.opcheck(ops.bn_backward_reduce.default, (dy, z, mask, mean, invstd), **kw)
        s_dy, s_dyx = ops.bn_backward_reduce(dy.detach(), z.detach(), mask, mean, invstd)
        torch.library.opcheck(ops.bn_backward_elemt.default, (dy, z, mask, mean, invstd, w, s_dy, s_dyx, 24, True),
                              **kw)
        torch.library.opcheck(ops.bn_backward_elemt.default,
                              (dy, z, mask, mean, invstd, None, s_dy, s_dyx, 24, False), **kw)


def test_bad_inputs():
    dy, z, mask, mean, invstd, w = _inputs((2, 5, 4, 3), False, torch.float32, "cpu")
    s_dy, s_dyx = ops.bn_backward_reduce(dy, z, mask, mean, invstd)
    with pytest.raises(RuntimeError, match="`count`"):
        ops.bn_backward_elemt(dy, z, mask, mean, invstd, w, s_dy, s_dyx, 0, False)
    with pytest.raises(RuntimeError, match="`sum_dy`"):
        ops.bn_backward_elemt(dy, z, mask, mean, invstd, w, s_dy[:3], s_dyx, 24, False)
    with pytest.raises(RuntimeError, match="`dy`"):
        ops.bn_backward_reduce(dy[:1], z, mask, mean, invstd)
    with pytest.raises(RuntimeError, match="`mask`"):
        ops.bn_backward_reduce(dy, z, mask[:2], mean, invstd)
    with pytest.raises(RuntimeError, match="`mean`"):
        ops.bn_backward_reduce(dy, z, mask, mean[:2], invstd)
