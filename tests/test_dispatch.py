"""Backend selection: names, availability, errors, the env var, resolve()."""

import os

import subprocess
import sys

import pytest
import torch

import fused_resnet
from fused_resnet import config, dispatch


def test_reference_always_available_and_auto_default():
    av = fused_resnet.availability()
    assert av["reference"].available
    assert set(fused_resnet.BACKENDS) <= set(av)
    assert fused_resnet.get_backend() == "auto"


def test_unknown_backend_lists_what_is_available():
    with pytest.raises(fused_resnet.BackendError, match=r"unknown backend 'fast'.*available here: auto, reference"):
        fused_resnet.set_backend("fast")
    with pytest.raises(fused_resnet.BackendError, match="unknown backend"):
        fused_resnet.resnet18(backend="nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_unavailable_backend_says_why():
    with pytest.raises(fused_resnet.BackendError, match=r"backend 'cuda' is not available here: .*Available: auto"):
        fused_resnet.set_backend("cuda")


def test_set_backend_global_and_per_model():
    fused_resnet.set_backend("reference")  # the autouse fixture restores the setting
    assert fused_resnet.get_backend() == "reference"
    m = fused_resnet.resnet18(num_classes=3)
    assert m.layer1[0].resolved_backend(torch.zeros(1)) == "reference"
    m.set_backend("auto")
    assert m.layer1[0].backend == "auto"


def test_the_environment_variable_is_read_at_import():
    config.load_environment({"FUSED_RESNET_BACKEND": "reference"})
    assert fused_resnet.get_backend() == "reference" and config.source("backend") == "$FUSED_RESNET_BACKEND"
    with pytest.warns(RuntimeWarning, match="ignoring .FUSED_RESNET_BACKEND='bogus'"):
        config.load_environment({"FUSED_RESNET_BACKEND": "bogus"})
    assert fused_resnet.get_backend() == "auto"
    env = dict(os.environ, FUSED_RESNET_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", "import fused_resnet; print(fused_resnet.get_backend())"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "reference", out.stdout + out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_an_unavailable_backend_from_the_environment_names_the_variable():
    config.load_environment({"FUSED_RESNET_BACKEND": "cudnn"})
    with pytest.raises(fused_resnet.BackendError, match=r"\$FUSED_RESNET_BACKEND: backend 'cudnn' is not available"):
        fused_resnet.get_backend()


def test_auto_on_cpu_prefers_cpu_kernels_and_triton_hands_cpu_tensors_over():
    want = "cpu" if fused_resnet.availability()["cpu"].available else "reference"
    assert dispatch.resolve("auto", torch.device("cpu")) == want
    if not dispatch.triton_interpreter_on():
        assert dispatch.resolve("triton", torch.device("cpu")) == want


def test_info_command_runs_and_lists_backends():
    out = subprocess.run([sys.executable, "-m", "fused_resnet", "info"], capture_output=True, text=True, check=True)
    for name in ("reference", "cpu", "cuda", "triton", "triton-interpreter", "cudnn"):
        assert name in out.stdout


def test_import_survives_a_missing_extension():
    code = (
        "import sys; sys.modules['fused_resnet._C'] = None\n"
        "import fused_resnet\n"
        "av = fused_resnet.availability()\n"
        "assert av['reference'].available and not av['cpu'].available, av\n"
        "print(av['cpu'].reason)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "did not load" in out.stdout


def test_resolve_follows_changes_after_earlier_answers():
    """resolve() remembers its answers; a changed global choice must still
    take effect on the next call."""
    cpu = torch.device("cpu")
    want = "cpu" if fused_resnet.availability()["cpu"].available else "reference"
    fused_resnet.set_backend("auto")
    assert dispatch.resolve(None, cpu) == want
    fused_resnet.set_backend("reference")
    assert dispatch.resolve(None, cpu) == "reference"
    assert dispatch.resolve("auto", cpu) == want  # a module's own choice wins
    fused_resnet.set_backend("auto")
    assert dispatch.resolve(None, cpu) == want


def test_a_recorded_auto_choice_is_adopted_per_gpu(tmp_path, monkeypatch):
    import json

    from fused_resnet.tools.bench import auto_choice

    monkeypatch.setattr(dispatch, "AUTO_CHOICES_DIR", tmp_path / "auto_choices")
    dispatch.recorded_auto_choice.cache_clear()
    record = {"schema": 1, "source": {"device_name": "NVIDIA H100 80GB HBM3", "model": "resnet50"},
              "default": "cuda", "candidates": ["cuda", "cudnn", "triton"],
              "classes": {"train/inner/3x3/s1": {"backend": "triton"}, "inference/last/1x1/s1": {"backend": "cudnn"},
                          "train/stem/7x7/s2": {"backend": None}, "inference/inner/1x1/s1": {"backend": "cpu"}}}
    src = tmp_path / "auto_choice.json"
    src.write_text(json.dumps(record))
    written = auto_choice.install(src)
    assert written == tmp_path / "auto_choices" / "nvidia-h100-80gb-hbm3.json"
    # Classes without a winner, and names that are not GPU backends, are not followed.
    assert dispatch.recorded_auto_choice("NVIDIA H100 80GB HBM3") == {
        "train/inner/3x3/s1": "triton", "inference/last/1x1/s1": "cudnn"}
    assert dispatch.recorded_auto_choice("NVIDIA A100-SXM4-40GB") == {}
    src.write_text(json.dumps({"schema": 1, "classes": {}}))
    with pytest.raises(ValueError, match="not an auto_choice.json"):
        auto_choice.install(src)
    dispatch.recorded_auto_choice.cache_clear()
