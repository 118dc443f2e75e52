"""fused_resnet.set_relu_saves("output"): the fused BN + add + ReLU keeps the
ReLU output (which the next conv saves anyway) instead of a bit mask, so a
training step holds no more activation memory than eager. Results must equal
the mask mode's (the same values up to a few ulps where the kernels' masked
and unmasked code paths round differently), on the native path and on the
custom-op path torch.compile traces; the saved activations must not exceed
eager's."""

import copy

import pytest
import torch
import torchvision

import fused_resnet
from fused_resnet.ops import batch_norm_act


@pytest.fixture
def relu_saves():
    old = fused_resnet.relu_saves()
    yield fused_resnet.set_relu_saves
    fused_resnet.set_relu_saves(old)


def _run(mode, backend, native, dtype=torch.float64, cl=False):
    fused_resnet.set_relu_saves(mode)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 6, 5, 4, generator=gen, dtype=dtype)
    r = torch.randn(3, 6, 5, 4, generator=gen, dtype=dtype)
    if cl:
        z, r = z.to(memory_format=torch.channels_last), r.to(memory_format=torch.channels_last)
    z.requires_grad_(True)
    r.requires_grad_(True)
    w = torch.rand(6, generator=gen, dtype=dtype).add_(0.5).requires_grad_(True)
    b = torch.randn(6, generator=gen, dtype=dtype).requires_grad_(True)
    rm, rv, nbt = torch.zeros(6, dtype=dtype), torch.ones(6, dtype=dtype), torch.zeros((), dtype=torch.long)
    if not native:  # force the custom op (the path torch.compile traces)
        import sys

        bna = sys.modules["fused_resnet.ops.batch_norm_act"]  # the module, not the function it exports
        orig = bna._native_steps
        bna._native_steps = lambda chosen, t: False
    try:
        y = batch_norm_act(z, w, b, rm, rv, nbt, training=True, momentum=0.1, eps=1e-5, residual=r, backend=backend)
    finally:
        if not native:
            bna._native_steps = orig
    g = torch.randn(y.shape, generator=gen, dtype=dtype)
    y.backward(g)
    return [y.detach(), z.grad, r.grad, w.grad, b.grad, rm, rv]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "custom-op"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_output_mode_gives_the_mask_modes_bits(relu_saves, backend, native, cl):
    if backend == "reference" and native:
        pytest.skip("the reference backend always takes the custom op")
    for dtype in (torch.float64, torch.float32):
        a = _run("mask", backend, native, dtype, cl)
        b = _run("output", backend, native, dtype, cl)
        eps = torch.finfo(dtype).eps
        for name, x, y in zip(["y", "dz", "dr", "dw", "db", "running_mean", "running_var"], a, b):
            if name in ("dz", "dw", "db"):  # sums and FMAs in another order: a few ulps
                torch.testing.assert_close(y, x, rtol=8 * eps, atol=8 * eps * x.abs().max().item(),
                                           msg=lambda m: f"{name} ({dtype}): {m}")
            else:
                assert torch.equal(x, y), f"{name} differs between relu_saves='mask' and 'output' ({dtype})"


def test_output_mode_detects_an_in_place_change_of_the_output(relu_saves):
    relu_saves("output")
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    y = batch_norm_act(z, None, None, None, None, None, training=True, momentum=0.1, eps=1e-5)
    y.mul_(2)  # autograd must refuse, as it does for eager's ReLU
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_bad_mode():
    with pytest.raises(ValueError, match="relu_saves"):
        fused_resnet.set_relu_saves("bits")


def _saved_bytes(model, x):
    """Bytes of distinct storages autograd saves during one forward."""
    seen = {}

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
        except RuntimeError:
            return t
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def test_saved_activations_not_above_eager_in_output_mode(relu_saves):
    torch.manual_seed(0)
    eager = torchvision.models.resnet18(num_classes=10).train()
    fused = fused_resnet.resnet18(num_classes=10).train().set_backend("cpu")
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 64, 64, requires_grad=False)
    eager_bytes = _saved_bytes(copy.deepcopy(eager), x)
    relu_saves("mask")
    mask_bytes = _saved_bytes(copy.deepcopy(fused), x)
    relu_saves("output")
    output_bytes = _saved_bytes(copy.deepcopy(fused), x)
    assert output_bytes <= eager_bytes, (output_bytes, eager_bytes)
    assert output_bytes < mask_bytes, (output_bytes, mask_bytes)
