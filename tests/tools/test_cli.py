"""The `fused-resnet` command line: argument errors, a tiny bench run and its
JSON, verify (which must also catch a corrupted fused model), and the
measurement helpers behind them."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

import fused_resnet
from fused_resnet.tools import cli
from fused_resnet.tools.bench import report, roofline, timing, verify

BENCH_KEYS = {"schema", "config", "environment", "memory_definition", "providers", "results"}
ROW_KEYS = {"mode", "provider", "kind", "backend", "status", "reason", "images_per_s", "ratio_to_eager",
            "ratio_to_compile", "median_ms", "p50_ms", "p90_ms", "times_ms", "peak_mem_mib", "first_call_s",
            "max_err", "mean_err", "eager_err", "err_bound", "numerics_ok", "fallbacks"}


def _error_of(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    # argparse prints the usage, then exactly one line with the message.
    assert err and "error:" in err[-1], err
    return err[-1]


@pytest.mark.parametrize("argv, expect", [
    (["bench", "--model", "resnet7"], "--model 'resnet7': expected one of resnet18"),
    (["verify", "--model", "vgg16"], "--model 'vgg16': expected one of resnet18"),
    (["bench", "--device", "cpu", "--dtype", "fp16"], "fp16 is not supported on CPU"),
    (["bench", "--dtype", "int8"], "--dtype must be one of"),
    (["bench", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["verify", "--model", "resnet18", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["bench", "--providers", "eager,tensorrt"], "unknown provider 'tensorrt'"),
    (["bench", "--steps", "0"], "--steps must be >= 1"),
    (["bench", "--image-size", "16"], "--image-size must be >= 32"),
    (["verify", "--model", "resnet18", "--backend", "nosuch"], "unknown backend 'nosuch'"),
    (["verify", "--model", "resnet18", "--state-dict", "/nonexistent/w.pt"], "no such file"),
])
def test_argument_errors_are_one_line_and_nonzero(capsys, argv, expect):
    assert expect in _error_of(capsys, argv)


def test_cuda_device_without_gpu_is_an_argument_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert "no CUDA GPU is visible" in _error_of(capsys, ["bench", "--device", "cuda"])


def test_tiny_bench_runs_and_writes_documented_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--model", "resnet18", "--batch-size", "4", "--image-size", "64", "--device", "cpu",
                   "--steps", "1", "--warmup", "0", "--providers", "eager,fused-cpu,fused-cuda", "--quiet",
                   "--json", str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert BENCH_KEYS <= set(data)
    assert data["environment"]["torch"] == torch.__version__ and data["environment"]["device"] == "cpu"
    assert data["config"]["model"] == "resnet18" and data["config"]["modes"] == ["inference", "train"]
    rows = data["results"]
    for r in rows:
        assert ROW_KEYS <= set(r), set(r) ^ ROW_KEYS
    ran = [r for r in rows if r["status"] != "unavailable"]
    assert {(r["mode"], r["provider"]) for r in ran} >= {("inference", "eager"), ("train", "eager")}
    for r in ran:
        # Every row that ran was verified and timed; a failure shows in the exit status.
        assert r["status"] == "ok", (r["provider"], r["mode"], r["reason"])
        assert r["numerics_ok"] and r["max_err"] <= r["err_bound"]
        assert r["images_per_s"] > 0 and len(r["times_ms"]) == 1
        assert r["peak_mem_mib"] is not None and r["peak_mem_mib"] > 0
        assert r["ratio_to_eager"] == pytest.approx(r["images_per_s"] / next(
            e["images_per_s"] for e in ran if e["mode"] == r["mode"] and e["provider"] == "eager"))
    # A fused backend that cannot run here is listed with its reason, never replaced.
    cuda_rows = [r for r in rows if r["provider"] == "fused-cuda"]
    if not torch.cuda.is_available():
        assert cuda_rows and all(r["status"] == "unavailable" and r["reason"] for r in cuda_rows)
        assert "fused-cuda: not run (" in printed
    assert "verified" in printed and rc == 0


def test_cudnn_fallbacks_are_listed_in_the_bench_notes():
    from fused_resnet.tools.bench import report

    row = {"mode": "train", "provider": "fused-cudnn", "status": "ok", "reason": "", "numerics_ok": True,
           "fallbacks": ["conv_bias_act|cuda:0|bfloat16[8,3,7,7]\tno engine supports the graph"]}
    config = {"modes": ["inference", "train"], "batch_size": 256, "image_size": 224}
    notes = report._notes({"config": config, "results": [row, {**row, "mode": "inference", "fallbacks": []}]})
    assert notes[0].startswith("fused-cudnn [train]: 1 layer graph(s) refused by cuDNN")
    assert notes[1].strip() == "conv_bias_act|cuda:0|bfloat16[8,3,7,7]: no engine supports the graph"
    assert len(notes) == 2


@pytest.mark.parametrize("batch,size,warned", [(1, 64, True), (2, 64, True), (4, 64, False), (8, 224, False)])
def test_an_ill_conditioned_training_verification_is_pointed_out(batch, size, warned):
    from fused_resnet.tools.bench import report

    for modes, expect in ((["inference", "train"], warned), (["inference"], False)):
        config = {"modes": modes, "batch_size": batch, "image_size": size}
        notes = report._notes({"config": config, "results": []})
        assert any("ill-conditioned" in n for n in notes) == expect, notes
    _, note = verify.verify("resnet18", backends=["reference"], batch_size=batch, image_size=size, modes=("eval",))
    assert note is None


def test_verify_cli_passes_on_resnet18(capsys):
    rc = cli.main(["verify", "--model", "resnet18"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS" in out and "layer4.1" in out and "running stats" in out


def _models(corrupt: str | None):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10)
    verify.randomize_bn_state(tv)
    fused = fused_resnet.resnet18(num_classes=10)
    fused.load_state_dict(tv.state_dict())
    # The reference path: this checks verify's detection and localisation,
    # whatever state the fused kernels are in (the CLI test covers those).
    fused.set_backend("reference")
    if corrupt:
        with torch.no_grad():
            dict(fused.named_parameters())[corrupt].view(-1)[0] += 0.05
    reference = torchvision.models.resnet18(num_classes=10)
    reference.load_state_dict(tv.state_dict())
    return tv, fused, reference.double()


def test_verify_catches_a_corrupted_fused_model_and_locates_it():
    tv, fused, ref = _models(corrupt="layer3.1.conv1.weight")
    x = torch.randn(4, 3, 64, 64)
    result = verify.verify_models(tv, fused, ref, x)
    assert not result.ok
    bad = {(c.mode, c.point, c.what) for c in result.failures()}
    assert ("eval", "layer3.1", "output") in bad and ("train", "layer3.1", "output") in bad
    assert ("train", "logits", "output") in bad
    # Everything upstream of the corrupted conv still passes.
    for c in result.checks:
        if c.what == "output" and c.point in ("stem", "layer1.0", "layer2.1", "layer3.0"):
            assert c.ok, c
    # The same pair without the corruption passes: the failure is the weight, not the harness.
    tv, fused, ref = _models(corrupt=None)
    assert verify.verify_models(tv, fused, ref, x).ok


def test_peak_memory_sees_an_allocation_inside_the_step():
    def step():
        a = torch.ones(4 * 2**20 // 4)  # 4 MiB, freed on return
        return float(a.sum())

    peak = timing.peak_memory_bytes(step, "cpu")
    assert peak is not None and 4 * 2**20 <= peak < 16 * 2**20


def test_percentiles():
    assert timing.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert timing.percentile([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0], 90) == pytest.approx(10.0)


def test_roofline_counts_every_conv_analytically():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    layers = roofline.conv_layers(model, x)
    assert len(layers) == 20  # stem + 16 in blocks + 3 downsample
    stem = layers[0][0]
    assert stem.name == "conv1" and stem.out_shape == (2, 64, 32, 32)
    assert stem.flops == 2 * 2 * 64 * 32 * 32 * 3 * 7 * 7
    assert stem.min_bytes == 4 * (2 * 3 * 64 * 64 + 64 * 3 * 49 + 2 * 64 * 32 * 32)


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    result = {"config": {"model": "m", "batch_size": 1, "image_size": 32, "dtype": "fp32", "channels_last": True,
                         "steps": 1, "warmup": 0},
              "environment": {"device_name": "cpu", "device": "cpu", "cpu_threads": 1, "torch": "x"},
              "results": [{"mode": "inference", "provider": "eager", "kind": "eager", "images_per_s": 3.0,
                           "numerics_ok": True}]}
    path = tmp_path / "chart.png"
    assert report.write_plot(result, str(path)) is None
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_info_lists_backends_and_every_setting_with_its_source(capsys):
    from fused_resnet import config

    old = fused_resnet.set_fusions(prologue=True)
    try:
        assert cli.main(["info"]) == 0
    finally:
        fused_resnet.set_fusions(**old)
    out = capsys.readouterr().out
    assert "backends:" in out and "reference" in out
    lines = out.splitlines()
    for s in config.SETTINGS:
        line = [ln for ln in lines if ln.strip().startswith(s.name + " ") and ln.rstrip().endswith("$" + s.env)]
        assert len(line) == 1, f"no settings line for {s.name}:\n{out}"
    fusions = [ln for ln in lines if ln.strip().startswith("fusions ")][0]
    assert "prologue=1" in fusions and "set_fusions()" in fusions
    relu = [ln for ln in lines if ln.strip().startswith("relu_saves ")][0]
    assert fused_resnet.relu_saves() in relu


@pytest.mark.parametrize("interleave", [True, False])
def test_bench_times_providers_in_rounds_or_back_to_back(interleave):
    from fused_resnet.tools.bench import runner

    calls = []

    class Step:
        def __init__(self, name, fail_at=None):
            self.name, self.fail_at, self.n = name, fail_at, 0

        def call(self):
            self.n += 1
            if self.n == self.fail_at:
                raise RuntimeError("out of memory")
            calls.append(self.name)

    rows = [runner.Row(mode="train", provider=n, kind="k", backend=None, status="ok") for n in "abc"]
    cfg = runner.BenchConfig(model="resnet18", batch_size=1, image_size=32, dtype="fp32", device="cpu",
                             modes=("train",), steps=3, warmup=0, interleave=interleave)
    steps = [Step("a"), Step("b", fail_at=2), Step("c")]
    runner._time_rounds(list(zip(rows, steps)), cfg, torch.empty(1), progress=False)
    # b fails at its second step: it leaves the rounds as an error, the others go on.
    assert calls == (["a", "b", "c", "a", "c", "a", "c"] if interleave else ["a", "a", "a", "b", "c", "c", "c"])
    assert [len(r.times_ms) for r in rows] == [3, 0, 3]
    assert rows[1].status == "error" and "out of memory" in rows[1].reason
