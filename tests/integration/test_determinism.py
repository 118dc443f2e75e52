"""Under torch.use_deterministic_algorithms(True) the fused path is bitwise
reproducible: two identical training steps give identical bits."""

import copy

import pytest
import torch

from helpers import make_trio


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def deterministic():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


def _train_step(model, x, g):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    y = model(x)
    y.backward(g)
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    return y.detach(), grads


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_is_bitwise_reproducible(device, deterministic):
    fused, _, _ = make_trio("resnet18", device=device)
    assert fused.layer1[0].resolved_backend(torch.empty(0, device=device)) != "reference"
    twin = copy.deepcopy(fused)
    x = torch.randn(4, 3, 32, 32, device=device)
    g = torch.randn(4, 10, device=device)
    y1, g1 = _train_step(fused, x, g)
    y2, g2 = _train_step(twin, x, g)
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    for (name, a), (_, b) in zip(fused.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), name
    # And the eval path after the step (folded BN) too.
    fused.eval(), twin.eval()
    with torch.no_grad():
        assert torch.equal(fused(x), twin(x))
