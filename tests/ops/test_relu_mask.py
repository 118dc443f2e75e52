"""fused_resnet::relu_mask (the ReLU mask from a ReLU output, for
set_relu_saves("output")): bits against the reference packing, bn_apply's
layout, opcheck, bad inputs."""

import pytest
import torch

from fused_resnet import dispatch
from fused_resnet.ops import reference, relu_mask

pytestmark = pytest.mark.skipif(not dispatch.native_loaded(), reason="fused_resnet._C not built")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 19, 5, 7), (1, 3, 1, 1), (3, 64, 4, 4)], ids=str)
def test_bits_match_the_reference(dtype, channels_last, shape):
    y = torch.relu(torch.randn(shape)).to(dtype)
    if channels_last:
        y = y.to(memory_format=torch.channels_last)
    flat = y.view(-1) if y.is_contiguous() else y.permute(0, 2, 3, 1).reshape(-1)
    flat[:3] = torch.tensor([float("nan"), -0.0, float("inf")]).to(dtype)  # NaN keeps its gradient, -0 does not
    got = relu_mask(y)
    assert got.dtype == torch.uint8 and got.shape == ((y.numel() + 7) // 8,)
    assert torch.equal(got, reference.relu_mask(y))
    assert got[0].item() & 0b111 == 0b101
    assert dispatch.has_kernel("relu_mask", "CPU")


@pytest.mark.parametrize("channels_last", [False, True])
def test_same_bits_as_bn_apply_for_finite_outputs(channels_last):
    z = torch.randn(2, 24, 5, 5)
    if channels_last:
        z = z.to(memory_format=torch.channels_last)
    scale, shift = torch.rand(24) + 0.5, torch.randn(24)
    y, mask = torch.ops.fused_resnet.bn_apply(z, scale, shift, None, True, None)
    assert torch.equal(relu_mask(y), mask)


def test_opcheck():
    torch.library.opcheck(torch.ops.fused_resnet.relu_mask.default, (torch.randn(2, 3, 4, 5),))


def test_bad_input_names_the_argument():
    with pytest.raises(RuntimeError, match="`y` must be float32"):
        torch.ops.fused_resnet.relu_mask(torch.ones(4, dtype=torch.int64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_kernel_matches_the_cpu_kernel(dtype, channels_last):
    y = torch.relu(torch.randn(3, 37, 9, 7)).to(dtype)  # an odd element count: a partial last byte
    y[0, 0, 0, :3] = torch.tensor([float("nan"), -0.0, float("inf")]).to(dtype)
    if channels_last:
        y = y.to(memory_format=torch.channels_last)
    assert dispatch.has_kernel("relu_mask", "CUDA")
    assert torch.equal(relu_mask(y.cuda()).cpu(), relu_mask(y))
