"""fused_resnet::add_relu, the foundation op: opcheck, parity, errors."""

import pytest
import torch

from fused_resnet import dispatch
from fused_resnet.ops import add_relu, reference

pytestmark = pytest.mark.skipif(not dispatch.native_loaded(), reason="fused_resnet._C not built")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _inputs(device, dtype, channels_last=False, shape=(2, 5, 7, 3)):
    x = torch.randn(shape, device=device).to(dtype)
    r = torch.randn(shape, device=device).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, r


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_eager_bitwise(devices, dtype, channels_last):
    for device in devices:
        x, r = _inputs(device, dtype, channels_last)
        y = add_relu(x, r)
        assert torch.equal(y, torch.relu(x + r))
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_odd_sizes_views_and_nan(devices):
    for device in devices:
        base = torch.randn(3, 9, 11, 13, device=device)
        x = base[:, 1:8, ::2]  # non-contiguous view
        r = torch.randn_like(x)
        x[0, 0, 0, 0] = float("nan")
        x[0, 0, 0, 1] = float("inf")
        y = add_relu(x, r)
        torch.testing.assert_close(y, torch.relu(x + r), equal_nan=True)
        assert torch.isnan(y[0, 0, 0, 0]) and torch.isinf(y[0, 0, 0, 1])
        assert add_relu(x[:0], r[:0]).shape == x[:0].shape


def test_gradients():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: add_relu(a, b), (x, r))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(devices, requires_grad):
    for device in devices:
        x, r = _inputs(device, torch.float32)
        x.requires_grad_(requires_grad)
        r.requires_grad_(requires_grad)
        torch.library.opcheck(torch.ops.fused_resnet.add_relu.default, (x, r))


def test_reference_backend_is_the_definition():
    x, r = _inputs("cpu", torch.float32)
    assert torch.equal(add_relu(x, r, backend="reference"), reference.add_relu(x, r))


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="`residual` has shape"):
        torch.ops.fused_resnet.add_relu(x, torch.randn(2, 3, 4, 5))
    with pytest.raises(RuntimeError, match="`residual` has dtype"):
        torch.ops.fused_resnet.add_relu(x, x.double())
    with pytest.raises(RuntimeError, match="`x` must be float32, float16, bfloat16 or float64"):
        torch.ops.fused_resnet.add_relu(x.int(), x.int())
