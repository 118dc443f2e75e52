"""Whole fused models survive what users do with models: torch.save of the
whole module (pickle) and loading it in a fresh process, copy.deepcopy,
torch.multiprocessing's spawn. Converted models (whose classes convert()
made at run time) included: they come back fused, still isinstance of the
library's classes."""

from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision

import fused_resnet
from fused_resnet.backends import fold
from fused_resnet.nn import timm_blocks

HERE = os.path.dirname(os.path.abspath(__file__))


def _models():
    """name -> eval-mode model: built, converted torchvision, converted timm."""
    torch.manual_seed(0)
    out = {"built": fused_resnet.resnet18(num_classes=10)}
    out["torchvision"] = fused_resnet.convert(torchvision.models.resnet18(num_classes=10))
    try:
        import timm
    except ImportError:
        pass
    else:
        out["timm"] = fused_resnet.convert(timm.create_model("resnet18", pretrained=False, num_classes=10))
    for m in out.values():
        m.eval()
    return out


def _assert_fused(name: str, model: torch.nn.Module) -> None:
    if name == "torchvision":
        assert isinstance(model, torchvision.models.ResNet)
        assert isinstance(model.layer1[0], fused_resnet.FusedBasicBlock)
    elif name == "timm":
        import timm.models.resnet

        assert isinstance(model.layer1[0], timm.models.resnet.BasicBlock)
        assert isinstance(model.layer1[0], timm_blocks.FusedTimmBlock)
    else:
        assert isinstance(model, fused_resnet.ResNet)


def test_pickle_round_trip_in_process():
    x = torch.randn(2, 3, 64, 64)
    for name, model in _models().items():
        with torch.no_grad():
            want = model(x)
        for copied in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            _assert_fused(name, copied)
            # A copy has its own tensors: nothing of the original's fold cache.
            assert all(not fold.entries(m) for m in copied.modules())
            with torch.no_grad():
                torch.testing.assert_close(copied(x), want, rtol=0, atol=0)


def test_whole_model_checkpoints_load_in_a_fresh_process(tmp_path):
    x = torch.randn(2, 3, 64, 64)
    names = []
    for name, model in _models().items():
        with torch.no_grad():
            torch.save({"model": model, "x": x, "y": model(x)}, tmp_path / f"{name}.pt")
        names.append(name)
    child = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{HERE!r}, {os.path.dirname(HERE)!r}]
        import torch
        from fused_resnet.nn.paths import units
        from test_serialization import _assert_fused
        calls = []
        real = units.unit
        units.unit = lambda *a, **k: calls.append(1) or real(*a, **k)
        for name in {names!r}:
            saved = torch.load({str(tmp_path)!r} + f"/{{name}}.pt", weights_only=False)
            model = saved["model"]
            _assert_fused(name, model)
            calls.clear()
            with torch.no_grad():
                y = model(saved["x"])
            torch.testing.assert_close(y, saved["y"], rtol=1e-6, atol=1e-6)
            assert calls, name + ": the fused path did not run"
            print("ok", name)
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == [w for n in names for w in ("ok", n)]


def _spawned_forward(model, x, queue):
    with torch.no_grad():
        # A list, not a tensor: a tensor would travel as a shared-memory
        # handle that dies with this process.
        queue.put((type(model).__mro__[1].__name__, model(x).tolist()))


def test_torch_multiprocessing_spawn_takes_a_converted_model():
    model = _models()["torchvision"]
    x = torch.randn(2, 3, 64, 64)
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    proc = ctx.Process(target=_spawned_forward, args=(model, x, queue))
    proc.start()
    mixin, y = queue.get()
    proc.join(timeout=120)
    assert proc.exitcode == 0
    assert mixin == "FusedStemMixin"
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(y), model(x), rtol=1e-6, atol=1e-6)


def test_the_fold_cache_is_not_module_state():
    model = _models()["built"]
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert fold.entries(model.bn1), "the forward should have cached a fold"
    assert not any(k.startswith("_fused") for m in model.modules() for k in vars(m))
    buf = io.BytesIO()
    torch.save(model, buf)
    assert len(buf.getvalue()) < 1.05 * sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_every_pickle_protocol(protocol):
    model = _models()["torchvision"]
    again = pickle.loads(pickle.dumps(model, protocol=protocol))
    assert type(again) is type(model)
