"""Mutation safety (issue 7, item 5): in-place changes to weights and BN
buffers (load_state_dict, optimizer steps, edits under torch.no_grad()) are
seen by the very next forward, in eval (folded, cached) and in train."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import fused_resnet
from fused_resnet import numerics

BACKENDS = ["cpu", "reference"]


def _pair(backend):
    torch.manual_seed(0)
    eager = torchvision.models.resnet18(num_classes=4)
    fused = fused_resnet.resnet18(num_classes=4)
    fused.load_state_dict(eager.state_dict())
    fused.set_backend(backend)
    return fused, eager


def _same(fused, eager, x, what):
    with torch.no_grad():
        yf, ye = fused(x), eager(x)
        yr = copy.deepcopy(eager).double()(x.double())
    numerics.assert_close_to_reference(yf, ye, yr, dtype=torch.float32, what=what)


def _edits():
    """(name, fn(model)) in-place edits, each applied to both models alike."""
    def scale_weight(m):
        m.layer1[0].conv1.weight.mul_(-0.5)

    def shift_running_mean(m):
        m.layer2[0].bn2.running_mean.add_(0.3)

    def grow_running_var(m):
        m.layer3[0].downsample[1].running_var.mul_(4.0)

    def bn_affine(m):
        m.layer4[1].bn1.weight.fill_(0.25)
        m.bn1.bias.add_(0.5)

    def copy_into(m):
        m.layer1[1].conv2.weight.copy_(torch.full_like(m.layer1[1].conv2.weight, 0.01))

    def eps(m):
        m.layer2[1].bn1.eps = 0.5

    return [scale_weight, shift_running_mean, grow_running_var, bn_affine, copy_into, eps]


@pytest.mark.parametrize("edit", _edits(), ids=lambda f: f.__name__)
def test_no_grad_edits_seen_in_eval(edit):
    fused, eager = _pair("cpu")
    fused.eval(), eager.eval()
    x = torch.randn(2, 3, 16, 16)
    _same(fused, eager, x, "before")  # fills the fold caches
    with torch.no_grad():
        edit(fused), edit(eager)
    _same(fused, eager, x, f"after {edit.__name__}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_seen_by_next_forward(backend):
    fused, eager = _pair(backend)
    fused.eval(), eager.eval()
    x = torch.randn(2, 3, 16, 16)
    _same(fused, eager, x, "before")
    torch.manual_seed(1)
    other = torchvision.models.resnet18(num_classes=4)
    with torch.no_grad():
        for m in other.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    fused.load_state_dict(other.state_dict())
    _same(fused, other.eval(), x, "after load_state_dict")


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_steps_train_then_eval(backend):
    """Eval (caches filled), a train step, eval again: the second eval must
    equal a fresh eager model holding the stepped weights and buffers (the
    two models' training steps may differ by rounding, so each eval is
    checked against eager with the fused model's own state)."""
    fused, _ = _pair(backend)
    opt = torch.optim.SGD(fused.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(4, 3, 64, 64)  # 16 values per channel in layer4's training BatchNorms
    target = torch.randint(0, 4, (4,))
    for step in range(2):
        fused.eval()
        fresh = torchvision.models.resnet18(num_classes=4)
        fresh.load_state_dict(fused.state_dict())
        _same(fused, fresh.eval(), x, f"eval before step {step}")
        fused.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(fused(x), target).backward()
        opt.step()
    fused.eval()
    fresh = torchvision.models.resnet18(num_classes=4)
    fresh.load_state_dict(fused.state_dict())
    _same(fused, fresh.eval(), x, "eval after the steps")


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_forward_running_stats_seen_in_eval(backend):
    """BN recalibration: train-mode forwards without an optimizer step move
    only the running statistics (written by the native bn_finalize); the
    next eval must fold the new ones, not a cached fold of the old."""
    fused, _ = _pair(backend)
    x = torch.randn(4, 3, 64, 64)  # 16 values per channel in layer4's training BatchNorms
    fused.eval()
    with torch.no_grad():
        fused(x)  # fold caches filled
        fused.train()
        fused(x * 2 + 1)
    fused.eval()
    fresh = torchvision.models.resnet18(num_classes=4)
    fresh.load_state_dict(fused.state_dict())
    _same(fused, fresh.eval(), x, "eval after a train-mode forward")
