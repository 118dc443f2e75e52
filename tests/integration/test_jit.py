"""TorchScript: torch.jit.trace records the fused ops (deployment code traces
under torch.no_grad()), and torch.jit.script compiles built and converted
models to eager-equivalent ops (the fused path is Python dispatch that
TorchScript cannot compile), so converting a scriptable model never makes it
unscriptable. Either way the original model stays fused."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

from helpers import randomise_bn

import fused_resnet
from fused_resnet import numerics
from fused_resnet.nn.paths import units


# torch.jit warns that it is deprecated; that is the point of these tests.
# They compare eval-mode models only (no batch statistics to audit).
pytestmark = [pytest.mark.torchscript,
              pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning",
                                         "ignore:.*is deprecated:DeprecationWarning")]


def _trio(kind: str):
    torch.manual_seed(0)
    eager = torchvision.models.resnet18(num_classes=10)
    randomise_bn(eager)
    if kind == "built":
        model = fused_resnet.resnet18(num_classes=10)
        model.load_state_dict(eager.state_dict())
    elif kind == "torchvision":
        model = fused_resnet.convert(copy.deepcopy(eager))
    else:
        timm = pytest.importorskip("timm")
        eager = timm.create_model("resnet18", pretrained=False, num_classes=10)
        randomise_bn(eager)
        model = fused_resnet.convert(copy.deepcopy(eager))
    return model.eval(), eager.eval(), copy.deepcopy(eager).double()


def _count_units(monkeypatch) -> list:
    calls = []
    real = units.unit
    monkeypatch.setattr(units, "unit", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("kind", ["built", "torchvision", "timm"])
def test_trace_under_no_grad_gives_the_models_outputs(kind):
    model, eager, ref = _trio(kind)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        x2 = torch.randn(4, 3, 64, 64)  # another input, and another batch size
        yt, ym = traced(x2), model(x2)
        numerics.assert_close_to_reference(yt, eager(x2), ref(x2.double()), what=f"traced {kind}")
    torch.testing.assert_close(yt, ym, rtol=1e-5, atol=1e-5)


def test_trace_records_the_fused_ops_and_follows_weight_changes():
    model, _, _ = _trio("built")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
    graph = str(traced.inlined_graph)
    assert "fused_resnet::" in graph, "the trace should hold the fused ops"
    # The BN fold is part of the graph, not a constant: the traced module
    # follows an edit of its (shared) parameters.
    with torch.no_grad():
        model.layer2[0].bn1.weight.mul_(2.0)
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["built", "torchvision", "timm"])
def test_script_compiles_to_eager_ops_and_leaves_the_model_fused(kind, monkeypatch):
    model, eager, ref = _trio(kind)
    before = [type(m) for m in model.modules()]
    scripted = torch.jit.script(model)
    assert [type(m) for m in model.modules()] == before
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        numerics.assert_close_to_reference(scripted(x), eager(x), ref(x.double()), what=f"scripted {kind}")
        calls = _count_units(monkeypatch)
        model(x)
    assert calls, "the original model must still run fused after scripting"
    # The scripted module shares the model's parameters, as scripting does.
    with torch.no_grad():
        model.fc.bias.add_(1.0)
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)


def test_script_a_converted_segmentation_model():
    seg = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3,
                                                       aux_loss=False).eval()
    fused = fused_resnet.convert(copy.deepcopy(seg))
    assert isinstance(fused.backbone.layer1[0], fused_resnet.FusedBottleneck)
    scripted = torch.jit.script(fused)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = seg(x)["out"]
        torch.testing.assert_close(scripted(x)["out"], want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused(x)["out"], want, rtol=1e-4, atol=1e-4)
