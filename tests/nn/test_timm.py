"""fused_resnet.convert over timm's ResNets: the blocks are fused in place,
timm's modules and state_dict keys are kept, outputs (and in training,
gradients and running statistics) match eager timm by the numerics
criterion; blocks we cannot fuse exactly (SE) are left unchanged with a warning."""

import copy
import warnings

import pytest
import torch

from helpers import compare_step, randomise_bn

import fused_resnet
from fused_resnet.nn import timm_blocks

timm = pytest.importorskip("timm")


def _trio(name):
    torch.manual_seed(0)
    eager = timm.create_model(name, pretrained=False, num_classes=10)
    randomise_bn(eager)
    ref = copy.deepcopy(eager).double()
    fused = copy.deepcopy(eager)
    keys = list(fused.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every block of these models is fusable
        assert fused_resnet.convert(fused) is fused
    assert list(fused.state_dict()) == keys
    return fused, eager, ref


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_converted_timm_model_matches_in_eval(name):
    fused, eager, ref = _trio(name)
    blocks = [m for m in fused.modules() if isinstance(m, timm_blocks.FusedTimmBlock)]
    assert len(blocks) == sum(len(getattr(fused, f"layer{i}")) for i in range(1, 5))
    with torch.no_grad():
        compare_step(fused, eager, ref, torch.randn(2, 3, 32, 32), train=False, what=f"timm {name} eval",
                     backward=False)


def test_converted_timm_resnet18_trains_like_eager():
    fused, eager, ref = _trio("resnet18")
    compare_step(fused, eager, ref, torch.randn(4, 3, 64, 64), train=True, what="timm resnet18 train")


def test_fused_path_is_taken(monkeypatch):
    fused, _, _ = _trio("resnet18")
    if "cpu" not in fused_resnet.available_backends():
        pytest.skip("no native CPU kernels built")
    calls = []
    from fused_resnet.nn.paths import units

    real = units.unit
    monkeypatch.setattr(units, "unit", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused.train()(torch.randn(2, 3, 32, 32))
    assert len(calls) == 8 * 2 + 3  # two units per block, plus the three downsample units


def test_se_blocks_are_left_unchanged_with_a_warning():
    torch.manual_seed(0)
    model = timm.create_model("seresnet50", pretrained=False, num_classes=10).eval()
    before = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"layer1\.0 .*Bottleneck"):
        fused_resnet.convert(model)
    assert not any(isinstance(m, timm_blocks.FusedTimmBlock) for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), before(x))
