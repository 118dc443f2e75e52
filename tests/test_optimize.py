"""fused_resnet.optimize(): eval mode, folds and oneDNN prepacks made ahead,
channels_last, torchvision models converted, the backend argument, and (GPU
only) the CUDA-graph wrapper. Outputs are judged by the numerics criterion
against an fp64 reference, relative to the unoptimised eval model's error."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import fused_resnet
from fused_resnet import numerics
from fused_resnet.backends import fold
from fused_resnet.optimize import CUDAGraphModule

from helpers import make_trio, randomise_bn


def _count_folds(monkeypatch):
    calls = []
    for name in ("fold", "fold_keep_bias"):
        real = getattr(fold, name)
        monkeypatch.setattr(fold, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    return calls


def test_optimize_matches_the_unoptimised_eval_model(monkeypatch):
    fused, eager, ref = make_trio("resnet18")
    fused.train()
    base = copy.deepcopy(fused).eval()  # the same model, not optimised
    x = torch.randn(2, 3, 32, 32)
    opt = fused_resnet.optimize(fused, x)
    assert opt is fused and not fused.training
    assert all(not m.training for m in fused.modules())
    if torch.backends.mkldnn.is_available():  # channels_last is the fast CPU layout with oneDNN
        assert fused.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        assert fused.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        yr = ref.eval()(x.double())
        y_base = base(x)
        numerics.assert_close_to_reference(eager.eval()(x), y_base, yr, what="unoptimised vs torchvision")
        folds = _count_folds(monkeypatch)
        for inp in (x.contiguous(memory_format=torch.channels_last), torch.randn(2, 3, 32, 32)):
            y = opt(inp)
            want = base(inp)
            numerics.assert_close_to_reference(y, want, ref(inp.double()), what="optimised vs unoptimised")
        # optimize() folded every BN (and prepacked oneDNN's weights) ahead.
        assert folds == [], f"{len(folds)} folds after optimize()"


def test_fold_cache_still_follows_weight_changes(monkeypatch):
    fused, eager, ref = make_trio("resnet18")
    x = torch.randn(2, 3, 32, 32)
    fused_resnet.optimize(fused, x)
    with torch.no_grad():
        for m in (fused, eager, ref):
            m.layer2[0].bn2.running_mean.add_(0.5)
            m.layer3[0].downsample[0].weight.mul_(-1.0)
        folds = _count_folds(monkeypatch)
        y = fused(x)
        assert folds, "a changed BN/conv must be folded again"
        numerics.assert_close_to_reference(y, eager.eval()(x), ref.eval()(x.double()), what="after a change")


def test_optimize_converts_a_torchvision_model_and_sets_the_backend():
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10)
    randomise_bn(tv)
    eager, ref = copy.deepcopy(tv).eval(), copy.deepcopy(tv).double().eval()
    x = torch.randn(2, 3, 32, 32)
    opt = fused_resnet.optimize(tv, x)
    assert opt is tv
    assert isinstance(tv.layer1[0], fused_resnet.FusedBasicBlock)
    with torch.no_grad():
        numerics.assert_close_to_reference(opt(x), eager(x), ref(x.double()), what="converted torchvision")
    fused_resnet.optimize(tv, x, backend="reference")
    assert tv.layer1[0].backend == "reference" and tv._backend_choice == "reference"
    with torch.no_grad():
        numerics.assert_close_to_reference(opt(x), eager(x), ref(x.double()), what="reference backend")
    with pytest.raises(fused_resnet.BackendError):
        fused_resnet.optimize(tv, x, backend="tritn")


def test_optimize_a_bare_block_returns_its_fused_twin():
    torch.manual_seed(0)
    ds = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, 2, bias=False), torch.nn.BatchNorm2d(16))
    block = torchvision.models.resnet.BasicBlock(8, 16, 2, ds)
    randomise_bn(block)
    eager, ref = copy.deepcopy(block).eval(), copy.deepcopy(block).double().eval()
    x = torch.randn(2, 8, 9, 9)
    opt = fused_resnet.optimize(block, x)
    assert isinstance(opt, fused_resnet.FusedBasicBlock) and opt.conv1 is block.conv1
    with torch.no_grad():
        numerics.assert_close_to_reference(opt(x), eager(x), ref(x.double()), what="bare block")


def test_bad_arguments():
    model = fused_resnet.resnet18(num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(TypeError, match="nn.Module"):
        fused_resnet.optimize(lambda t: t, x)
    with pytest.raises(TypeError, match="`example_input` must be a tensor"):
        fused_resnet.optimize(model, [x])
    with pytest.raises(TypeError, match="floating-point"):
        fused_resnet.optimize(model, x.long())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA example input"):
            fused_resnet.optimize(model, x, cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA tensor"):
        CUDAGraphModule(model, x)


@pytest.mark.cuda
def test_cuda_graph_replays_for_the_example_shape():
    fused, _, ref = make_trio("resnet18", device="cuda")
    base = copy.deepcopy(fused).eval()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    graphed = fused_resnet.optimize(fused, x, cuda_graph=True)
    assert isinstance(graphed, CUDAGraphModule) and graphed.module is fused
    with torch.no_grad():
        for _ in range(2):
            inp = torch.randn(4, 3, 32, 32, device="cuda")
            y = graphed(inp).clone()
            numerics.assert_close_to_reference(y, base(inp), ref.eval()(inp.double().cpu()), what="graph replay")
    with pytest.raises(ValueError, match="captured for input shape"):
        graphed(torch.randn(2, 3, 32, 32, device="cuda"))
    fused.train()
    with pytest.raises(RuntimeError, match="training mode"):
        graphed(x)
    fused.eval()
    with torch.no_grad():
        fused.fc.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="changed since"):
        graphed(x)
