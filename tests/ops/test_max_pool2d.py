"""fused_resnet::max_pool2d (F.max_pool2d without indices, for inference):
parity with F.max_pool2d, opcheck, the gradient fallback, bad inputs."""

import pytest
import torch
import torch.nn.functional as F

from fused_resnet import dispatch
from fused_resnet.ops import max_pool2d

pytestmark = pytest.mark.skipif(not dispatch.native_loaded(), reason="fused_resnet._C not built")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (kernel_size, stride, padding, dilation, ceil_mode): ResNet's stem pool first.
CONFIGS = [(3, 2, 1, 1, False), (3, 2, 1, 1, True), (2, None, 0, 1, False), (3, 1, 1, 2, False),
           ((3, 2), (2, 1), (1, 0), 1, True)]


def _native_ran(x):
    return dispatch.has_kernel("max_pool2d", "CPU") and x.device.type == "cpu"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_matches_f_max_pool2d_bitwise(dtype, channels_last, config):
    k, s, p, d, ceil_mode = config
    # Odd sizes and a channel count that is not a multiple of the vector width.
    x = torch.randn(2, 19, 9, 11).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x[0, 3, 2, 4] = float("nan")  # NaN propagates, as in eager
    x[1, 0, 0, 0] = float("-inf")
    x[1, 18, 8, 10] = float("inf")
    y = max_pool2d(x, k, s, p, d, ceil_mode)
    ref = F.max_pool2d(x, k, s, p, d, ceil_mode)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert _native_ran(x)


def test_non_contiguous_view_and_resnet_stem_shape():
    base = torch.randn(2, 70, 30, 30).to(memory_format=torch.channels_last)
    x = base[:, 3:67, 1:29, 2:30]  # a strided view, 64 channels
    torch.testing.assert_close(max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1), rtol=0, atol=0)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    x = torch.randn(2, 5, 8, 7, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.fused_resnet.max_pool2d.default, (x, [3, 3], [2, 2], [1, 1], [1, 1], False),
                          test_utils=("test_schema", "test_faketensor"))


def test_gradient_falls_back_to_f_max_pool2d():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    y = max_pool2d(x, 3, 2, 1)
    assert y.grad_fn is not None  # F.max_pool2d's, with its indices
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    F.max_pool2d(x2, 3, 2, 1).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)


def test_bad_inputs_name_the_argument():
    op = torch.ops.fused_resnet.max_pool2d
    with pytest.raises(RuntimeError, match="`padding` must be between 0 and half the kernel size"):
        op(torch.randn(1, 2, 8, 8), [3, 3], [2, 2], [2, 2], [1, 1], False)
    with pytest.raises(RuntimeError, match="`x` must be 4-D"):
        op(torch.randn(2, 8, 8), [3, 3], [2, 2], [1, 1], [1, 1], False)
    with pytest.raises(RuntimeError, match="`x` must be float32"):
        op(torch.ones(1, 2, 8, 8, dtype=torch.int32), [3, 3], [2, 2], [1, 1], [1, 1], False)
    with pytest.raises(RuntimeError, match="must be positive"):
        op(torch.randn(1, 2, 8, 8), [3, 3], [0, 2], [1, 1], [1, 1], False)
    with pytest.raises(RuntimeError, match="output would be empty"):
        op(torch.randn(1, 2, 2, 2), [3, 3], [1, 1], [0, 0], [2, 2], False)
    with pytest.raises(ValueError, match="`stride` must be an int or a pair"):
        max_pool2d(torch.randn(1, 2, 8, 8), 3, (1, 2, 3))
