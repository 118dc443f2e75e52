"""`--model` for bench / verify / roofline (fused_resnet/tools/bench/models.py):
fused_resnet's builders, torchvision:NAME, timm:NAME, module:function and
file.py:function, each turned into an eager model and its fused counterpart
(fuse() for all but the builders)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet.tools import cli
from fused_resnet.tools.bench import models

D2L = '''
import torch
from torch import nn
from torch.nn import functional as F


class Residual(nn.Module):  # the d2l block: convs with bias, a 1x1 conv shortcut without BN
    def __init__(self, cin, cout, use_1x1conv=False, strides=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, stride=strides)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv3 = nn.Conv2d(cin, cout, 1, stride=strides) if use_1x1conv else None
        self.bn1, self.bn2 = nn.BatchNorm2d(cout), nn.BatchNorm2d(cout)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.conv3:
            x = self.conv3(x)
        return F.relu(y + x)


def tiny_resnet(num_classes=10):
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        Residual(16, 16), Residual(16, 32, use_1x1conv=True, strides=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))
'''


@pytest.fixture
def d2l_file(tmp_path):
    path = tmp_path / "d2l_models.py"
    path.write_text(D2L)
    return path


def _fused_units(model: nn.Module) -> int:
    return len(fused_resnet.fuse_report(model).fused)


def test_builtin_name_builds_torchvision_and_fused_resnet_models():
    eager = models.eager_builder("resnet18")(10)
    assert type(eager).__module__.startswith("torchvision")
    fused = models.fused_from("resnet18", eager, "reference", 10)
    assert isinstance(fused, fused_resnet.ResNet) and fused.backend == "reference"
    for a, b in zip(eager.state_dict().values(), fused.state_dict().values()):
        assert torch.equal(a, b)


def test_fused_model_builds_a_builtin_without_the_eager_model(monkeypatch):
    sd = models.eager_builder("resnet18")(10).state_dict()

    def no_eager(spec):
        raise AssertionError(f"built the eager {spec} for a builtin name")

    monkeypatch.setattr(models, "eager_builder", no_eager)
    fused = models.fused_model("resnet18", sd, "cpu", 10)
    assert isinstance(fused, fused_resnet.ResNet) and fused.backend == "cpu"
    assert all(torch.equal(sd[k], v) for k, v in fused.state_dict().items())


def test_fused_model_of_a_spec_fuses_its_eager_model(d2l_file):
    sd = models.eager_builder(f"{d2l_file}:tiny_resnet")(4).state_dict()
    fused = models.fused_model(f"{d2l_file}:tiny_resnet", sd, None, 4)
    assert _fused_units(fused) >= 3
    assert all(torch.equal(sd[k], v) for k, v in fused.state_dict().items())


def test_torchvision_and_timm_specs_go_through_fuse():
    eager = models.eager_builder("torchvision:resnet18")(7)
    assert eager.fc.out_features == 7
    pytest.importorskip("timm")
    eager = models.eager_builder("timm:resnet26d")(5)
    fused = models.fused_from("timm:resnet26d", eager, None, 5)
    assert fused is not eager and fused_resnet.fuse_report(fused).converted
    assert list(fused.state_dict()) == list(eager.state_dict())


def test_file_and_module_entry_points(d2l_file, monkeypatch):
    eager = models.eager_builder(f"{d2l_file}:tiny_resnet")(4)
    assert eager[-1].out_features == 4
    fused = models.fused_from(f"{d2l_file}:tiny_resnet", eager, None, 4)
    assert _fused_units(fused) >= 3
    monkeypatch.syspath_prepend(str(d2l_file.parent))
    eager = models.eager_builder("d2l_models:tiny_resnet")(3)
    assert eager[-1].out_features == 3


@pytest.mark.parametrize("spec, message", [
    ("vgg", "expected one of resnet18"),
    ("torchvision:no_such_net", "has no 'no_such_net'"),
    ("no_such_module:f", "cannot import 'no_such_module'"),
    ("/nonexistent/file.py:f", "no such file"),
    ("torch:nn", "is not callable"),
])
def test_bad_specs_say_what_was_expected(spec, message):
    with pytest.raises(models.ModelSpecError, match=message):
        models.eager_builder(spec)


def test_a_callable_returning_no_module_is_refused(d2l_file):
    d2l_file.write_text("def nothing():\n    return 3\n")
    with pytest.raises(models.ModelSpecError, match="returned int, expected a torch.nn.Module"):
        models.eager_builder(f"{d2l_file}:nothing")(10)


def test_verify_cli_takes_a_file_entry_point(d2l_file, capsys):
    rc = cli.main(["verify", "--model", f"{d2l_file}:tiny_resnet", "--batch-size", "4", "--image-size", "32",
                   "--backend", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "grad (normwise)" in out and "running stats" in out and "PASS" in out


def test_verify_catches_a_broken_fused_model_from_fuse(d2l_file):
    from fused_resnet.tools.bench import verify

    eager = models.eager_builder(f"{d2l_file}:tiny_resnet")(10)
    verify.randomize_bn_state(eager)
    fused = models.fused_from(f"{d2l_file}:tiny_resnet", eager, "cpu", 10)
    with torch.no_grad():
        fused[3].bn2.weight[0] += 0.5  # one channel of the last block, fused
    x = torch.randn(4, 3, 32, 32)
    import copy

    result = verify.verify_models(eager, fused, copy.deepcopy(eager).double(), x, modes=("eval",))
    assert not result.ok
    assert {c.point for c in result.failures()} >= {"3", "logits"}


def test_bench_cli_takes_a_file_entry_point(d2l_file, tmp_path):
    import json

    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--model", f"{d2l_file}:tiny_resnet", "--device", "cpu", "--batch-size", "4",
                   "--image-size", "32", "--steps", "1", "--warmup", "0", "--providers", "eager,fused-cpu",
                   "--mode", "both", "--no-memory", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in ("eager", "fused-cpu")
                                                          for m in ("inference", "train")}
    assert all(r["status"] == "ok" for r in rows), rows


def test_layers_refuses_a_model_outside_the_builders(d2l_file):
    with pytest.raises(SystemExit):
        cli.main(["layers", "--model", f"{d2l_file}:tiny_resnet"])


def test_eager_builder_accepts_a_callable_without_num_classes(d2l_file):
    d2l_file.write_text(textwrap.dedent('''
        from torch import nn
        def fixed():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    '''))
    assert isinstance(models.eager_builder(f"{d2l_file}:fixed")(1000), nn.Sequential)
