"""Inference of a whole ResNet without gradients on CPU: each block's last
conv writes its output over the shortcut tensor (the downsample's output, or
the block input where the model's own chain owns it), the pool skips aten's
indices. Checked: numbers as eager's, the in-place path really taken, the
caller's input and tensors held by hooks never overwritten, a lower peak."""

import copy

import pytest
import torch
import torchvision

import fused_resnet
from fused_resnet import dispatch, numerics
from fused_resnet.tools.bench.timing import peak_memory_bytes

from helpers import make_trio

pytestmark = [
    pytest.mark.skipif(not dispatch.native_loaded(), reason="fused_resnet._C not built"),
    pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the in-place path is oneDNN's"),
]


def _in_place_convs(model, x, mode=torch.no_grad) -> int:
    from torch.profiler import profile

    with mode(), profile() as prof:
        model(x)
    return sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_convolution_pointwise_")


def _blocks(model):
    return [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_matches_eager_and_every_block_accumulates_in_place(name, mode):
    fused, eager, ref = make_trio(name)
    for m in (fused, eager, ref):
        m.eval()
    fused, eager = (m.to(memory_format=torch.channels_last) for m in (fused, eager))
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    # Every block ends in conv + sum post-op: identity blocks over their input.
    assert _in_place_convs(fused, x, mode) == len(_blocks(fused))
    with mode():
        yf, ye = fused(x), eager(x)
    yr = ref(x.double())
    numerics.assert_close_to_reference(yf, ye, yr, what=f"{name} logits")
    # A second call (the fold and packed weights cached) gives the same.
    with mode():
        torch.testing.assert_close(fused(x), yf, rtol=0, atol=0)


def test_the_callers_input_is_never_overwritten():
    """A stem of Identity modules hands the caller's tensor to layer1; an
    identity block must not write over it, and a block called on its own
    must not write over its input either."""
    fused, eager, ref = make_trio("resnet18")
    for m in (fused, eager):
        m.conv1, m.bn1, m.relu, m.maxpool = (torch.nn.Identity() for _ in range(4))
        m.eval()
    x = torch.randn(2, 64, 16, 16).to(memory_format=torch.channels_last)
    kept = x.clone()
    with torch.no_grad():
        yf, ye = fused(x), eager(x)
        assert torch.equal(x, kept)
        torch.testing.assert_close(yf, ye, rtol=1e-4, atol=1e-4)
        block = fused.layer1[0]  # an identity block
        block(x)
        assert torch.equal(x, kept)


@pytest.mark.parametrize("where", ["block", "layer", "maxpool", "global"])
def test_tensors_held_by_hooks_survive(where):
    fused, _, _ = make_trio("resnet18")
    fused.eval()
    held, copies = [], []

    def hook(module, inputs, output):
        held.append(output)
        copies.append(output.clone())

    target = {"block": fused.layer1[0], "layer": fused.layer1, "maxpool": fused.maxpool}.get(where)
    handle = (torch.nn.modules.module.register_module_forward_hook(hook) if target is None
              else target.register_forward_hook(hook))
    try:
        x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
        with torch.no_grad():
            fused(x)
    finally:
        handle.remove()
    assert held
    for h, c in zip(held, copies):
        assert torch.equal(h, c), f"a tensor handed to a {where} hook was overwritten"


def test_peak_memory_below_eager_channels_last():
    torch.manual_seed(0)
    eager = torchvision.models.resnet50().eval().to(memory_format=torch.channels_last)
    fused = fused_resnet.convert(copy.deepcopy(eager))
    x = torch.randn(2, 3, 96, 96).to(memory_format=torch.channels_last)
    with torch.no_grad():
        fused(x), eager(x)  # folds, packed weights, oneDNN primitives
        peak_fused = peak_memory_bytes(lambda: fused(x), "cpu")
        peak_eager = peak_memory_bytes(lambda: eager(x), "cpu")
    assert peak_fused is not None and peak_eager is not None
    # eager holds the stem output, pool indices and each block's temporaries
    # side by side; the fused chain measured about half of it.
    assert peak_fused < 0.75 * peak_eager, (peak_fused, peak_eager)
