"""fused_resnet/config.py: every setting read from the environment once, at
import, validated; changed only through its function; listed in the docs."""

from __future__ import annotations

import subprocess
import sys

import pytest

import fused_resnet
from fused_resnet import config
from helpers import REPO


def _load(monkeypatch, **environ):
    for s in config.SETTINGS:
        monkeypatch.delenv(s.env, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    config.load_environment()


@pytest.mark.parametrize("env,value,setting,expected", [
    ("FUSED_RESNET_BACKEND", " Reference ", "backend", "reference"),
    ("FUSED_RESNET_FUSIONS", "shortcut_gemm=0, prologue=on", "fusions",
     {"shortcut_gemm": False, "prologue": True, "prologue_dgrad": True}),
    ("FUSED_RESNET_RELU_SAVES", "mask", "relu_saves", "mask"),
    ("FUSED_RESNET_AUTOTUNE", "off", "autotune", False),
    ("FUSED_RESNET_AUTOTUNE_SHAPE_S", "2.5", "autotune_shape_s", 2.5),
    ("FUSED_RESNET_AUTOTUNE_RUN_S", "0", "autotune_run_s", 0.0),
    ("FUSED_RESNET_CPU_CACHE_MB", "3", "cpu_cache_bytes", 3 << 20),
])
def test_each_variable_parses_and_names_its_source(monkeypatch, env, value, setting, expected):
    _load(monkeypatch, **{env: value})
    assert config.get(setting) == expected
    assert config.source(setting) == f"${env}"


@pytest.mark.parametrize("env,value,setting", [
    ("FUSED_RESNET_BACKEND", "tpu", "backend"),
    ("FUSED_RESNET_FUSIONS", "prologue=maybe", "fusions"),
    ("FUSED_RESNET_FUSIONS", "no_such_fusion=1", "fusions"),
    ("FUSED_RESNET_RELU_SAVES", "everything", "relu_saves"),
    ("FUSED_RESNET_AUTOTUNE", "2", "autotune"),
    ("FUSED_RESNET_AUTOTUNE_SHAPE_S", "-1", "autotune_shape_s"),
    ("FUSED_RESNET_AUTOTUNE_RUN_S", "soon", "autotune_run_s"),
    ("FUSED_RESNET_CPU_CACHE_MB", "lots", "cpu_cache_bytes"),
])
def test_a_bad_value_warns_naming_the_variable_and_keeps_the_default(monkeypatch, env, value, setting):
    with pytest.warns(RuntimeWarning, match=env):
        _load(monkeypatch, **{env: value})
    default = next(s.default for s in config.SETTINGS if s.name == setting)
    assert config.get(setting) == default and config.source(setting) == "default"


def test_the_environment_is_read_at_import_only(monkeypatch):
    _load(monkeypatch)
    monkeypatch.setenv("FUSED_RESNET_RELU_SAVES", "mask")
    assert fused_resnet.relu_saves() == "output"  # read at import, not per call


def test_import_reads_the_environment_in_a_fresh_process():
    code = ("import fused_resnet\n"
            "from fused_resnet import config\n"
            "print(config.get('relu_saves'), config.source('relu_saves'), config.get('fusions')['prologue'])\n")
    env = {"FUSED_RESNET_RELU_SAVES": "mask", "FUSED_RESNET_FUSIONS": "prologue=1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["mask", "$FUSED_RESNET_RELU_SAVES", "True"]


def test_setters_validate_and_return_what_restores_them():
    with pytest.raises(ValueError, match="unknown fusion 'shortcut'"):
        fused_resnet.set_fusions(shortcut=False)
    with pytest.raises(TypeError, match="`prologue` must be True or False"):
        fused_resnet.set_fusions(prologue=1)
    with pytest.raises(ValueError, match="mode must be one of"):
        fused_resnet.set_relu_saves("none")
    with pytest.raises(ValueError, match="`shape_s` must be seconds"):
        fused_resnet.set_autotune(shape_s=-1)
    with pytest.raises(TypeError, match="`enabled` must be True or False"):
        fused_resnet.set_autotune("yes")
    old = fused_resnet.set_fusions(shortcut_gemm=False)
    assert config.fusion("shortcut_gemm") is False and config.source("fusions") == "set_fusions()"
    fused_resnet.set_fusions(**old)
    assert fused_resnet.get_fusions() == old


def test_get_fusions_is_a_copy():
    fusions = fused_resnet.get_fusions()
    fusions["prologue"] = not fusions["prologue"]
    assert fused_resnet.get_fusions()["prologue"] != fusions["prologue"]


def test_override_sets_for_a_block_and_restores_on_error():
    before = config.snapshot()
    with pytest.raises(RuntimeError, match="inside"):
        with config.override(relu_saves="mask", backend="reference"):
            assert fused_resnet.relu_saves() == "mask" and fused_resnet.get_backend() == "reference"
            raise RuntimeError("inside")
    assert config.snapshot() == before
    with pytest.raises(KeyError, match="no setting 'speed'"):
        with config.override(speed="fast"):
            pass


def test_cache_dir_default_and_setter(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fused_resnet.set_cache_dir(None)
    assert config.cache_dir() == tmp_path / "fused_resnet"
    fused_resnet.set_cache_dir(tmp_path / "elsewhere")
    assert config.cache_dir() == tmp_path / "elsewhere"


def test_describe_lists_every_setting():
    rows = config.describe()
    assert [r[0] for r in rows] == [s.name for s in config.SETTINGS]
    assert all(r[3].startswith("FUSED_RESNET_") for r in rows)


def test_the_documentation_table_is_generated_from_the_code():
    root = REPO
    proc = subprocess.run([sys.executable, str(root / "tools" / "update_docs.py"), "--check"], capture_output=True,
                          text=True, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = (root / "docs" / "configuration.md").read_text()
    assert config.markdown_table() in text
