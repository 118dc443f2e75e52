"""Bad inputs (issue 7, item 2): each raises an error that names the argument
and what was expected, or behaves exactly as eager PyTorch does (N=0, a
single value per channel in training, NaN/Inf, state_dict mismatches)."""

from __future__ import annotations

import pytest
import torch
import torchvision

import fused_resnet
from fused_resnet.ops import add_relu, batch_norm_act, bn_apply, bn_stats, conv2d_bn_act

BACKENDS = ["reference", "cpu"]


def _bn(c=3):
    bn = torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def _bna(bn, z, training=True, residual=None, backend="cpu"):
    return batch_norm_act(z, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                          training=training, momentum=bn.momentum, eps=bn.eps, residual=residual, backend=backend)


# ------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.complex64])
def test_non_float_dtypes_name_the_argument(dtype):
    x = torch.ones(2, 3, 4, 4, dtype=dtype)
    s = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"`x` must be float32, float16, bfloat16 or float64"):
        add_relu(x, x, backend="cpu")
    with pytest.raises(RuntimeError, match=r"`z` must be float32, float16, bfloat16 or float64"):
        bn_apply(x, s, s, None, True, backend="cpu")
    with pytest.raises(RuntimeError, match=r"`z` must be float32"):
        bn_stats(x, backend="cpu")
    with pytest.raises(RuntimeError, match=r"`z` must be float32"):
        _bna(_bn(), x)
    with pytest.raises(TypeError, match=r"`x` must be a floating-point tensor"):
        conv2d_bn_act(x, torch.ones(5, 3, 3, 3, dtype=dtype))


def test_dtype_mismatches_name_the_arguments():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match=r"`residual` has dtype Double but `x` has dtype Float"):
        add_relu(x, x.double(), backend="cpu")
    with pytest.raises(TypeError, match=r"`weight` has dtype torch.float32 but `x` has torch.float64"):
        conv2d_bn_act(x.double(), torch.randn(5, 3, 3, 3))


@pytest.mark.parametrize("train", [True, False])
def test_model_input_dtype(train):
    model = fused_resnet.resnet18(num_classes=4).train(train)
    with pytest.raises(TypeError, match=r"input must be a floating-point tensor, got torch.int64"):
        model(torch.zeros(2, 3, 16, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"floating-point tensor, got torch.complex64"):
        model(torch.zeros(2, 3, 16, 16, dtype=torch.complex64))
    # A float dtype that is not the weights' fails as eager does (aten's text
    # names both types).
    with pytest.raises(RuntimeError, match=r"[Dd]ouble"):
        model(torch.zeros(2, 3, 16, 16, dtype=torch.float64))


# ------------------------------------------------------------------ shapes


def test_wrong_rank():
    s = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"`z` must have at least 2 dims \(N, C, ...\), got shape \[3\]"):
        bn_apply(torch.randn(3), s, s, None, True, backend="cpu")
    with pytest.raises(RuntimeError, match=r"`z` must have at least 2 dims"):
        bn_stats(torch.randn(3), backend="cpu")
    with pytest.raises(ValueError, match=r"`x` must be 4-D \(N, C_in, H, W\), got shape \[3, 5, 5\]"):
        conv2d_bn_act(torch.randn(3, 5, 5), torch.randn(5, 3, 3, 3))
    with pytest.raises(ValueError, match=r"`weight` must be 4-D"):
        conv2d_bn_act(torch.randn(1, 3, 5, 5), torch.randn(5, 3, 3))


@pytest.mark.parametrize("train", [True, False])
def test_model_wrong_rank_matches_batchnorm2d(train):
    fused = fused_resnet.resnet18(num_classes=4).train(train)
    eager = torchvision.models.resnet18(num_classes=4).train(train)
    for m in (fused, eager):
        with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
            m(torch.randn(3, 16, 16))


def test_channel_count_different_from_weights():
    s = torch.ones(4)
    with pytest.raises(RuntimeError, match=r"`scale` must be a 1-D tensor of C=3 values"):
        bn_apply(torch.randn(2, 3, 4, 4), s, s, None, True, backend="cpu")
    with pytest.raises(RuntimeError, match=r"`weight` must be a 1-D tensor of C=4 values"):
        _bna(_bn(3), torch.randn(2, 4, 3, 3))
    with pytest.raises(RuntimeError, match=r"expected input\[2, 4, 5, 5\] to have 3 channels"):
        conv2d_bn_act(torch.randn(2, 4, 5, 5), torch.randn(5, 3, 3, 3))
    with pytest.raises(RuntimeError, match=r"to have 3 channels, but got 4"):
        fused_resnet.resnet18(num_classes=4)(torch.randn(2, 4, 16, 16))


def test_residual_of_wrong_shape():
    x = torch.randn(2, 3, 4, 4)
    s = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"`residual` has shape \[1, 3, 4, 4\] but `x` has shape \[2, 3, 4, 4\]"):
        add_relu(x, x[:1], backend="cpu")
    with pytest.raises(RuntimeError, match=r"`residual` has shape \[2, 2, 4, 4\] but `z`"):
        bn_apply(x, s, s, x[:, :2], True, backend="cpu")
    with pytest.raises(RuntimeError, match=r"`residual` has shape \[2, 3, 2, 2\] but `z`"):
        _bna(_bn(), x, residual=torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"`residual` must have the output's shape \[2, 5, 5, 5\], got \[2, 5, 2, 2\]"):
        conv2d_bn_act(torch.randn(2, 3, 5, 5), torch.randn(5, 3, 3, 3), residual=torch.randn(2, 5, 2, 2), padding=1)


# ------------------------------------------------------------------ devices


@pytest.mark.cuda
def test_cpu_and_cuda_mixed():
    x = torch.randn(2, 3, 4, 4)
    xc = x.cuda()
    with pytest.raises(RuntimeError, match=r"`residual`.*(device|cuda|cpu)"):
        add_relu(xc, x, backend="cuda")
    s = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"`scale`.*(device|cuda|cpu)"):
        bn_apply(xc, s, s.cuda(), None, True, backend="cuda")
    with pytest.raises(ValueError, match=r"`weight` is on cpu but `x` is on cuda"):
        conv2d_bn_act(xc, torch.randn(5, 3, 3, 3))
    model = fused_resnet.resnet18(num_classes=4).cuda()
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 3, 16, 16))  # CPU input, CUDA weights: aten's error, as eager
    with pytest.raises(RuntimeError):
        fused_resnet.resnet18(num_classes=4)(torch.randn(2, 3, 16, 16, device="cuda"))


# ------------------------------------------------------------------ as eager


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_behaves_as_eager(train, backend):
    torch.manual_seed(0)
    eager = torchvision.models.resnet18(num_classes=4).train(train)
    fused = fused_resnet.resnet18(num_classes=4).train(train)
    fused.load_state_dict(eager.state_dict())
    fused.set_backend(backend)
    x = torch.randn(0, 3, 16, 16)
    ye, yf = eager(x), fused(x)
    assert yf.shape == ye.shape == (0, 4)
    for (name, bf), (_, be) in zip(fused.named_buffers(), eager.named_buffers()):
        assert torch.equal(bf, be), f"{name} changed differently for N=0"
    # The op itself: eager BN on an empty batch returns an empty batch.
    bn = _bn()
    assert _bna(bn, torch.randn(0, 3, 4, 4), training=train, backend=backend).shape == (0, 3, 4, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_value_per_channel_in_training(backend):
    msg = r"Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 3, 1, 1\]\)"
    with pytest.raises(ValueError, match=msg):
        _bn().train()(torch.randn(1, 3, 1, 1))  # eager's own text, the same
    with pytest.raises(ValueError, match=msg):
        _bna(_bn(), torch.randn(1, 3, 1, 1), backend=backend)
    model = fused_resnet.resnet18(num_classes=4).train()
    model.set_backend(backend)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training"):
        model(torch.randn(1, 3, 16, 16))


def _nan_inf_input(shape):
    z = torch.randn(shape)
    z[0, 0, 0, 0] = float("nan")
    z[1, 1, 1, 1] = float("inf")
    z[0, 2, 1, 0] = float("-inf")
    return z


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_inf_propagate_as_eager(train, backend):
    bn = _bn().train(train)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    fused_bn = _bn().train(train)
    fused_bn.load_state_dict(bn.state_dict())
    z = _nan_inf_input((2, 3, 3, 3))
    r = torch.randn(2, 3, 3, 3)
    ye = torch.relu(bn(z) + r)
    yf = _bna(fused_bn, z, training=train, residual=r, backend=backend)
    assert torch.equal(torch.isnan(yf), torch.isnan(ye)), "NaN positions differ from eager"
    assert torch.equal(torch.isinf(yf), torch.isinf(ye)), "Inf positions differ from eager"
    fin = torch.isfinite(ye)
    torch.testing.assert_close(yf[fin], ye[fin])
    for name in ("running_mean", "running_var"):
        a, b = getattr(fused_bn, name), getattr(bn, name)
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: NaN pattern differs from eager"
    # add_relu: relu(NaN) is NaN in eager too.
    x = _nan_inf_input((2, 3, 3, 3))
    torch.testing.assert_close(add_relu(x, r, backend=backend), torch.relu(x + r), equal_nan=True)


# ------------------------------------------------------------------ state_dict


def _sd_error(model, sd):
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(sd)
    return str(info.value).replace(type(model).__name__, "MODEL")


def test_state_dict_errors_are_pytorchs():
    eager = torchvision.models.resnet18(num_classes=4)
    fused = fused_resnet.resnet18(num_classes=4)
    good = eager.state_dict()
    cases = {
        "missing": {k: v for k, v in good.items() if k != "layer1.0.bn1.running_var"},
        "extra": {**good, "layer1.0.bn1.bogus": torch.zeros(1)},
        "shape": {**good, "layer2.0.conv1.weight": torch.zeros(3, 3, 3, 3)},
    }
    expect = {"missing": "Missing key(s)", "extra": "Unexpected key(s)", "shape": "size mismatch for"}
    for what, sd in cases.items():
        fe = _sd_error(fused, sd)
        assert expect[what] in fe, f"{what}: {fe}"
        assert fe == _sd_error(torchvision.models.resnet18(num_classes=4), sd), f"{what}: text differs from eager"


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_op_keeps_running_stats(backend):
    bn, ref = _bn(), _bn()
    ref.load_state_dict(bn.state_dict())
    z = torch.randn(0, 3, 4, 4)
    ref.train()(z)
    assert _bna(bn, z, backend=backend).shape == (0, 3, 4, 4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), getattr(ref, name)), f"{name} differs from eager after N=0"
