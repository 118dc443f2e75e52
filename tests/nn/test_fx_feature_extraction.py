"""torch.fx symbolic tracing of fused models (fused_resnet/nn/fx_tracing.py):
torchvision's create_feature_extractor gives torchvision's node names and
features, in eval and in training (gradients, running statistics), for
built and converted models, and the traced module still runs the fused
blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import fused_resnet
from fused_resnet import numerics
from fused_resnet.nn.paths import block as block_paths
from helpers import make_trio

RETURN = {"relu": "stem", "layer1": "c2", "layer2": "c3", "layer4": "c5", "fc": "logits"}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_eval_features_and_node_names_match_torchvision(arch):
    fused, tv, ref = make_trio(arch)
    tv.eval()
    fused.eval()
    ref.eval()
    train_names, eval_names = get_graph_node_names(fused)
    assert train_names == eval_names
    for name in ("conv1", "bn1", "relu", "maxpool", "avgpool", "flatten", "fc"):
        assert name in eval_names
    # One node per block, under the block's path.
    assert "layer1.0.fused_block" in eval_names and not any(n.startswith("layer1.0.conv") for n in eval_names)
    x = torch.randn(2, 3, 64, 64)
    got = create_feature_extractor(fused, RETURN)(x)
    want = create_feature_extractor(tv, RETURN)(x)
    high = create_feature_extractor(ref, RETURN)(x.double())
    assert got.keys() == want.keys()
    for k in want:
        numerics.assert_close_to_reference(got[k], want[k], high[k], what=f"{arch} feature {k}")


def test_traced_module_runs_the_fused_blocks(monkeypatch):
    fused, _, _ = make_trio("resnet18")
    fused.eval()
    fe = create_feature_extractor(fused, {"layer4": "c5"})
    calls = []
    real = block_paths.block_forward

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(block_paths, "block_forward", spy)
    fe(torch.randn(1, 3, 32, 32))
    assert len(calls) == 8  # resnet18's eight blocks, each through the fused path


def test_training_features_give_torchvision_gradients_and_running_stats():
    fused, tv, ref = make_trio("resnet18")
    nodes = {"layer2": "c3", "layer4": "c5"}
    fes = [create_feature_extractor(m.train(), nodes) for m in (fused, tv, ref)]
    x = torch.randn(4, 3, 64, 64)
    grads = []
    for fe in fes:
        xi = x.to(next(fe.parameters()).dtype)
        out = fe(xi)
        (out["c3"].square().mean() + out["c5"].sum()).backward()
        grads.append({n: p.grad for n, p in fe.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        numerics.assert_close_to_reference(*(g[n] for g in grads), kind="grad", what=f"grad {n}")
    bufs = [dict(fe.named_buffers()) for fe in fes]
    for n in bufs[0]:
        if n.endswith("num_batches_tracked"):
            assert torch.equal(bufs[0][n], bufs[1][n]), n
        else:
            numerics.assert_close_to_reference(*(b[n] for b in bufs), what=n)


def test_converted_torchvision_model_and_plain_symbolic_trace():
    _, tv, ref = make_trio("resnet50")
    tv.eval()
    ref.eval()
    converted = fused_resnet.convert(copy.deepcopy(tv))
    x = torch.randn(2, 3, 64, 64)
    traced = torch.fx.symbolic_trace(converted)
    numerics.assert_close_to_reference(traced(x), tv(x), ref(x.double()), what="traced logits")
    got = create_feature_extractor(converted, {"layer3": "c4"})(x)["c4"]
    want = create_feature_extractor(tv, {"layer3": "c4"})(x)["c4"]
    numerics.assert_close_to_reference(got, want, create_feature_extractor(ref, {"layer3": "c4"})(x.double())["c4"],
                                       what="converted layer3")
