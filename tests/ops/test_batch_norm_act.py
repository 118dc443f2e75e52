"""fused_resnet.ops.batch_norm_act against nn.BatchNorm2d + add + ReLU (eager),
train and eval: outputs, every gradient, running statistics and
num_batches_tracked, judged with fused_resnet.numerics against fp64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_resnet import dispatch, numerics
from fused_resnet.ops import batch_norm_act

pytestmark = pytest.mark.skipif(not dispatch.native_loaded(), reason="fused_resnet._C not built")


def _bn(C, device, **kw):
    bn = nn.BatchNorm2d(C, **kw)
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        if bn.track_running_stats:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.num_batches_tracked.fill_(2)
    return bn.to(device)


def _run(bn, z, r, fused, relu=True, backend=None):
    """y and the gradients (z, r, weight, bias) for grad_out fixed by seed."""
    z = z.detach().clone().requires_grad_()
    r = None if r is None else r.detach().clone().requires_grad_()
    if fused:
        y = batch_norm_act(z, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                           training=bn.training, momentum=bn.momentum, eps=bn.eps, residual=r, relu=relu,
                           backend=backend)
    else:
        y = bn(z)
        if r is not None:
            y = y + r
        if relu:
            y = torch.relu(y)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device, y.dtype)
    y.backward(g)
    grads = [z.grad, None if r is None else r.grad]
    grads += [None if bn.weight is None else bn.weight.grad, None if bn.bias is None else bn.bias.grad]
    return y, grads


def _compare(C, z, r, device, dtype, train, relu=True, **bn_kw):
    """fused (dtype) vs eager (dtype) vs reference (fp64 eager), all state."""
    base = _bn(C, "cpu", **bn_kw)
    mods = {}
    for name in ("fused", "eager", "ref"):
        m = copy.deepcopy(base).to(device)
        m.train(train)
        mods[name] = m
    mods["ref"].double()
    if dtype in (torch.float16, torch.bfloat16):  # autocast-style: fp32 params, low-precision activations
        pass
    else:
        mods["fused"].to(dtype)
        mods["eager"].to(dtype)
    zr, rr = z.double(), None if r is None else r.double()
    fused = _run(mods["fused"], z, r, True, relu)
    eager = _run(mods["eager"], z, r, False, relu) if dtype not in (torch.float16, torch.bfloat16) else \
        _run_autocast_eager(mods["eager"], z, r, relu)
    ref = _run(mods["ref"], zr, rr, False, relu)
    assert fused[0].dtype == z.dtype
    numerics.assert_close_to_reference(fused[0], eager[0], ref[0], dtype=dtype, what="y")
    for name, a, e, x in zip(("dz", "dr", "dweight", "dbias"), fused[1], eager[1], ref[1]):
        if x is None:
            assert a is None
            continue
        numerics.assert_close_to_reference(a, e, x, dtype=dtype, kind="grad", what=name)
    f, e, x = mods["fused"], mods["eager"], mods["ref"]
    if x.track_running_stats:
        numerics.assert_close_to_reference(f.running_mean, e.running_mean, x.running_mean, dtype=dtype, what="rm")
        numerics.assert_close_to_reference(f.running_var, e.running_var, x.running_var, dtype=dtype, what="rv")
        assert int(f.num_batches_tracked) == int(e.num_batches_tracked) == int(x.num_batches_tracked)
    return fused, eager, ref


def _run_autocast_eager(bn, z, r, relu):
    # What eager does for fp16/bf16 activations with fp32 BN parameters.
    z = z.detach().clone().requires_grad_()
    r = None if r is None else r.detach().clone().requires_grad_()
    y = F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                     bn.training or bn.running_mean is None, 0.0 if bn.momentum is None else bn.momentum, bn.eps)
    if bn.training and bn.track_running_stats:
        # F.batch_norm got the factor; keep the counter in step like the module.
        bn.num_batches_tracked.add_(1)
    if r is not None:
        y = y + r
    if relu:
        y = torch.relu(y)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device, y.dtype)
    y.backward(g)
    return y, [z.grad, None if r is None else r.grad, bn.weight.grad, bn.bias.grad]


def _inputs(shape, device, dtype, cl_z=False, cl_r=False, scale=2.0, shift=0.5):
    z = (torch.randn(shape, device=device) * scale + shift).to(dtype)
    r = torch.randn(shape, device=device).to(dtype)
    if cl_z:
        z = z.to(memory_format=torch.channels_last)
    if cl_r:
        r = r.to(memory_format=torch.channels_last)
    return z, r


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("cl", [False, True])
def test_matches_eager(devices, dtype, train, cl):
    for device in devices:
        z, r = _inputs((3, 6, 5, 7), device, dtype, cl, cl)
        _compare(6, z, r, device, dtype, train)


@pytest.mark.parametrize(
    "shape",
    [(1, 5, 4, 4), (16, 13, 1, 1), (2, 3, 64, 64), (2, 24, 3, 3)],
    ids=["N=1", "HW=1,C=13", "large-HW", "C=24"],
)
def test_shapes(devices, shape):
    for device in devices:
        z, r = _inputs(shape, device, torch.float32, cl_z=True)
        _compare(shape[1], z, r, device, torch.float32, True)


def test_momentum_one_gives_batch_statistics(devices):
    """momentum=1: running_mean is the batch mean and running_var the unbiased
    batch variance, so the statistics are compared directly."""
    for device in devices:
        z, r = _inputs((4, 5, 6, 6), device, torch.float32, cl_z=True)
        fused, _, _ = _compare(5, z, r, device, torch.float32, True, momentum=1.0)
        bn = _bn(5, device, momentum=1.0)
        batch_norm_act(z, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                       training=True, momentum=1.0, eps=bn.eps, residual=r)
        zd = z.double()
        torch.testing.assert_close(bn.running_mean.double(), zd.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), zd.var(dim=(0, 2, 3), unbiased=True), rtol=1e-5, atol=1e-6)


def test_momentum_none_cumulative(devices):
    for device in devices:
        for _ in range(2):
            z, r = _inputs((2, 4, 5, 5), device, torch.float32)
            _compare(4, z, r, device, torch.float32, True, momentum=None)


@pytest.mark.parametrize("train", [True, False])
def test_no_running_stats_and_no_affine(devices, train):
    for device in devices:
        z, r = _inputs((2, 4, 5, 5), device, torch.float32)
        _compare(4, z, r, device, torch.float32, train, track_running_stats=False)
        _compare(4, z, r, device, torch.float32, train, affine=False)
        _compare(4, z, None, device, torch.float32, train, relu=False)


def test_mixed_formats_and_views(devices):
    for device in devices:
        z, r = _inputs((2, 6, 5, 5), device, torch.float32, cl_z=True, cl_r=False)
        _compare(6, z, r, device, torch.float32, True)
        big = torch.randn(3, 8, 9, 11, device=device)
        zv = big[:, 1:7, ::2, 1:]  # non-contiguous view
        rv = torch.randn(3, 8, 9, 11, device=device)[:, :6, ::2, :10]
        _compare(6, zv, rv, device, torch.float32, True)


def test_large_mean_small_variance(devices):
    for device in devices:
        for cl in (False, True):
            z, r = _inputs((4, 3, 12, 12), device, torch.float32, cl_z=cl, scale=1e-2, shift=1e4)
            _compare(3, z, r, device, torch.float32, True)


def test_nan_inf_propagate_like_eager(devices):
    for device in devices:
        z, r = _inputs((2, 4, 3, 3), device, torch.float32)
        z[0, 1, 0, 0] = float("nan")
        z[1, 2, 1, 1] = float("inf")
        for train in (True, False):
            bn_f, bn_e = _bn(4, device), _bn(4, device)
            bn_e.load_state_dict(bn_f.state_dict())
            bn_f.train(train)
            bn_e.train(train)
            yf, gf = _run(bn_f, z, r, True)
            ye, ge = _run(bn_e, z, r, False)
            assert torch.equal(torch.isnan(yf), torch.isnan(ye)) and torch.equal(torch.isinf(yf), torch.isinf(ye))
            for a, b in zip(gf, ge):
                assert torch.equal(torch.isnan(a), torch.isnan(b)), "NaN pattern of a gradient differs from eager"
            assert torch.equal(torch.isnan(bn_f.running_mean), torch.isnan(bn_e.running_mean))


def test_single_value_per_channel_error(devices):
    for device in devices:
        bn = _bn(3, device)
        z = torch.randn(1, 3, 1, 1, device=device)
        with pytest.raises(ValueError) as eager_err:
            bn(z)
        with pytest.raises(ValueError) as fused_err:
            batch_norm_act(z, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                           training=True, momentum=0.1, eps=1e-5)
        assert str(fused_err.value) == str(eager_err.value)
        bn.eval()  # eval with running stats: one value is fine
        y = batch_norm_act(z, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                           training=False, momentum=0.1, eps=1e-5)
        torch.testing.assert_close(y, torch.relu(bn(z)))


def test_gradcheck_fp64():
    bn = _bn(3, "cpu").double()
    r = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w = bn.weight.detach().clone().requires_grad_()
    b = bn.bias.detach().clone().requires_grad_()
    for training in (True, False):
        def f(z, w, b, r):
            return batch_norm_act(z, w, b, bn.running_mean.clone(), bn.running_var.clone(), None,
                                  training=training, momentum=0.1, eps=1e-5, residual=r)
        torch.autograd.gradcheck(f, (z, w, b, r))


def test_reference_backend_agrees():
    z, r = _inputs((2, 5, 4, 4), "cpu", torch.float32, cl_z=True)
    bn1, bn2 = _bn(5, "cpu"), _bn(5, "cpu")
    bn2.load_state_dict(bn1.state_dict())
    y1, g1 = _run(bn1, z, r, True)
    y2, g2 = _run(bn2, z, r, True, backend="reference")
    torch.testing.assert_close(y1, y2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(bn1.running_var, bn2.running_var)


def test_torch_compile_fullgraph_train():
    """torch.compile(fullgraph=True) traces the op (stats, the in-place running
    update, the fused apply and its backward) with no graph break."""
    bn_e, bn_c = _bn(4, "cpu"), _bn(4, "cpu")
    bn_c.load_state_dict(bn_e.state_dict())

    def f(z, r, bn):
        return batch_norm_act(z, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                              training=True, momentum=bn.momentum, eps=bn.eps, residual=r)

    z, r = _inputs((2, 4, 5, 5), "cpu", torch.float32, cl_z=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ye, ge = _run_fn(f, z, r, bn_e)
    yc, gc = _run_fn(compiled, z, r, bn_c)
    torch.testing.assert_close(yc, ye)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(bn_c.running_mean, bn_e.running_mean)
    torch.testing.assert_close(bn_c.running_var, bn_e.running_var)
    assert int(bn_c.num_batches_tracked) == int(bn_e.num_batches_tracked) == 3


def _run_fn(fn, z, r, bn):
    z = z.detach().clone().requires_grad_()
    r = r.detach().clone().requires_grad_()
    y = fn(z, r, bn)
    y.backward(torch.ones_like(y))
    return y, (z.grad, r.grad, bn.weight.grad, bn.bias.grad)
