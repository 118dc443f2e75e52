"""The GPU check (fused_resnet/gpu_check/) and what it rests on, without a
GPU: the CPU rehearsal runs the lease's code path end to end (same step
runner, record writer and files, tiny sizes, the CPU providers); the plan's
figures fit the lease's first 8 minutes; a step or provider that runs out
of time is recorded and the rest still runs; the autotune caps, the tuned
configs carried between leases, the layer classes and the auto choice."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import fused_resnet
from fused_resnet.tools import cli
from fused_resnet.tools.bench import auto_choice, layers, providers, report, runner
from fused_resnet.tools.gpu_check import check, plan, record, selection, steps as gsteps, tuned_configs
from fused_resnet.tools.gpu_check.costs import Figure
from helpers import REPO

ROOT = str(REPO)
H100 = "NVIDIA H100 80GB HBM3"


# ------------------------------------------------------------- rehearsal


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """One CPU rehearsal of the whole check, into a temporary results folder
    and a stand-in for the device tool's $OUT."""
    base = tmp_path_factory.mktemp("rehearsal")
    out, results = base / "OUT", base / "results"
    rc = check.main(["--rehearsal", "--results-dir", str(results), "--out", str(out),
                     "--wheels-dir", str(base / "no-wheels"), "--work", str(base / "work")])
    (directory,) = results.iterdir()
    return rc, directory, out, json.loads((directory / "record.json").read_text())


def _row(result: dict, mode: str, provider: str) -> dict:
    (r,) = [r for r in result["results"] if r["mode"] == mode and r["provider"] == provider]
    return r


def test_rehearsal_writes_every_record_file_here_and_to_out(rehearsal):
    rc, directory, out, rec = rehearsal
    assert rc == 0, [(s["step"], s["status"], s["output_tail"][-500:]) for s in rec["steps"]]
    for name in record.FILES:
        assert (directory / name).is_file() and (out / name).is_file(), name
    # The device tool returns at most 8 plain files from $OUT.
    assert sorted(p.name for p in out.iterdir()) == sorted(record.FILES)
    assert json.loads((out / "record.json").read_text()) == rec
    assert [s["step"] for s in rec["steps"]] == [s["step"] for s in rec["plan"]] == [
        "wheels", "build", "bench-infer", "bench-train", "compile", "smoke-tests", "tests", "memcheck"]
    assert all(s["status"] == "ok" for s in rec["steps"])
    assert rec["environment"]["device"] == "cpu" and rec["profile"] == "rehearsal"
    log = (directory / "log.txt").read_text()
    assert "== bench-train" in log and "memcheck workload: " in log


def test_rehearsal_records_a_provider_over_its_budget_and_runs_the_next(rehearsal):
    rec = rehearsal[3]
    res = rec["bench_inference"]
    assert res["complete"] is True
    over = _row(res, "inference", "channels_last")
    assert over["status"] == "over budget" and "over its budget of 0 s" in over["reason"]
    assert over["numerics_ok"] is True and over["budget_s"] == 0
    after = _row(res, "inference", "fused-cpu")  # the provider after it ran in full
    assert after["status"] == "ok" and after["images_per_s"] > 0 and len(after["times_ms"]) == 1
    assert _row(res, "inference", "amp")["status"] == "unavailable"
    assert {r["provider"] for r in rec["bench_train"]["results"] if r["status"] == "ok"} == {"eager", "fused-cpu"}
    assert {r["mode"] for r in rec["bench_compile"]["results"]} == {"inference", "train"}


def test_rehearsal_records_each_layer_and_derives_the_auto_choice(rehearsal):
    _, directory, _, rec = rehearsal
    lay = rec["layers"]
    assert {e["mode"] for e in lay["layers"]} == {"inference", "train"}
    for e in lay["layers"]:
        layers.parse_layer_class(e["class"])
        assert set(e["results"]) == {layers.EAGER, "cpu"}
        assert e["results"]["cpu"]["status"] == "ok" and e["results"]["cpu"]["ms"] > 0
    assert lay["totals"]["train"]["cpu"]["complete"]
    choice = json.loads((directory / "auto_choice.json").read_text())
    assert choice == {**auto_choice.derive(lay), "source": {**auto_choice.derive(lay)["source"],
                                                            "date": rec["date"]}}
    assert set(choice["classes"]) == {e["class"] for e in lay["layers"]}
    assert all(c["backend"] == "cpu" for c in choice["classes"].values())


def test_rehearsal_counts_the_tests_and_writes_a_summary(rehearsal):
    _, directory, _, rec = rehearsal
    assert rec["tests"]["smoke-tests"]["counts"] == {"passed": 1}
    assert rec["tests"]["tests"]["counts"] == {"passed": 1}
    md = (directory / "summary.md").read_text()
    for part in ("## Steps", "| bench-infer | ok |", "## fused-resnet bench, inference", "OVER BUDGET",
                 "## Per layer", "auto choice", "## Tests"):
        assert part in md, part
    assert json.loads((directory / "autotune.json").read_text())["summary"]["entries"] == 0


# ------------------------------------------------ killed steps, time left


def _py_step(name: str, code: str, cap: float, **kw) -> plan.Step:
    return plan.Step(name, f"test step {name}", [sys.executable, "-c", code], Figure(1.0, "test"), cap_s=cap, **kw)


def _context(tmp_path) -> plan.Context:
    return plan.Context(python=sys.executable, root=ROOT, work=str(tmp_path / "work"), cores=2, arch="", wheels=[],
                        site=str(tmp_path / "site"))


def test_a_step_killed_at_its_limit_keeps_its_rows_and_the_earlier_steps(tmp_path):
    """The second step writes a row, then hangs: it is killed at its limit,
    the row and the first step's results stay in the record, and the third
    step runs."""
    first, second = tmp_path / "work" / "first.json", tmp_path / "work" / "second.json"
    row = {"mode": "train", "provider": "p", "status": "ok", "images_per_s": 1.0}
    steps = [
        _py_step("bench-infer", f"import json; json.dump({{'results': [], 'complete': True}}, open({str(first)!r}, 'w'))",
                 60, result="bench_inference", output=str(first)),
        _py_step("bench-train", f"import json, time; json.dump({{'results': [{row!r}], 'complete': False}}, "
                                f"open({str(second)!r}, 'w')); print('row written', flush=True); time.sleep(120)",
                 3, result="bench_train", output=str(second)),
        _py_step("compile", "print('the step after ran')", 60),
    ]
    (tmp_path / "work").mkdir()
    out = tmp_path / "OUT"
    rc = check.run(plan.PROFILES["rehearsal"], _context(tmp_path), steps, str(tmp_path / "results"), str(out))
    assert rc == 1
    rec = json.loads((out / "record.json").read_text())
    assert [(s["step"], s["status"]) for s in rec["steps"]] == [
        ("bench-infer", "ok"), ("bench-train", "timed out after 3 s"), ("compile", "ok")]
    assert rec["steps"][1]["seconds"] < 60  # killed, not waited for
    assert rec["bench_inference"] == {"results": [], "complete": True}
    assert rec["bench_train"]["complete"] is False and rec["bench_train"]["results"] == [row]
    log = (out / "log.txt").read_text()
    assert "row written" in log and "the step after ran" in log
    # A row the summary cannot format (this one lacks most fields) costs only its section.
    assert "could not format this section" in (out / "summary.md").read_text()


def test_steps_that_no_longer_fit_are_recorded_not_run_and_fill_steps_leave_room(tmp_path):
    profile = plan.Profile(**{**plan.PROFILES["rehearsal"].__dict__, "deadline_s": 100.0})
    ticks = iter([0.0] + [50.0] * 20)  # the check's clock: 50 s pass at once
    steps = [_py_step("smoke-tests", "print(1)", 180, tests=True, fill=True),
             _py_step("tests", "print(2)", 180, tests=True, min_s=60),
             _py_step("memcheck", "print(3)", 180, tests=True)]
    rc = check.run(profile, _context(tmp_path), steps, str(tmp_path / "results"), None, clock=lambda: next(ticks))
    assert rc == 1
    (directory,) = (tmp_path / "results").iterdir()
    rec = json.loads((directory / "record.json").read_text())
    got = {s["step"]: s for s in rec["steps"]}
    # 50 s left: the filling step keeps the later steps' estimates and the slack.
    assert got["smoke-tests"]["timeout_s"] == 50.0 - 2 * 1.0 - check.SLACK_S
    assert got["tests"]["status"] == "not run: 50 s left, it needs 60"
    assert got["memcheck"]["status"] == "ok"


def test_bench_keeps_each_final_row_on_disk_as_it_comes(tmp_path):
    path = tmp_path / "bench.json"

    class Killed(Exception):
        pass

    def on_update(partial):
        report.write_json(partial, str(path))
        if partial["results"]:
            raise Killed  # the process dies right after its first row

    cfg = runner.BenchConfig(model="resnet18", batch_size=4, image_size=64, dtype="fp32", device="cpu",
                             modes=("inference",), steps=1, warmup=0, providers=["eager", "fused-cpu"],
                             measure_memory=False, interleave=False)
    with pytest.raises(Killed):
        runner.run_bench(cfg, progress=False, on_update=on_update)
    data = json.loads(path.read_text())
    assert data["complete"] is False
    (r,) = data["results"]
    assert r["provider"] == "eager" and r["status"] == "ok" and r["images_per_s"] > 0


@pytest.mark.parametrize("interleave", [True, False])
def test_budgets_stop_a_provider_between_steps_and_the_others_go_on(interleave):
    calls = []

    class Step:
        def __init__(self, name):
            self.name = name

        def call(self):
            calls.append(self.name)

    rows = [runner.Row(mode="train", provider=n, kind="k", backend=None, status="ok") for n in "abc"]
    cfg = runner.BenchConfig(model="resnet18", batch_size=1, image_size=32, dtype="fp32", device="cpu",
                             modes=("train",), steps=3, warmup=0, interleave=interleave)
    budgets = [runner.Budget(None), runner.Budget(0.0), runner.Budget(None)]
    budgets[1].spent = 0.5  # already past its budget when the timing starts
    runner._time_rounds([(r, Step(r.provider)) for r in rows], cfg, torch.empty(1), False, budgets)
    assert [len(r.times_ms) for r in rows] == [3, 0, 3] and "b" not in calls
    assert rows[1].status == "over budget" and "after 0 of 3 timed steps" in rows[1].reason
    assert rows[0].status == rows[2].status == "ok"


def test_a_provider_outside_its_modes_gets_an_unavailable_row(monkeypatch):
    real = providers.select_providers
    train_only = providers.Provider("fused-cpu", "fused", "cpu", True, "C++ kernels", modes=("train",))

    def select(device, dtype, names=None):
        return [p if p.name != "fused-cpu" else train_only for p in real(device, dtype, names)]

    monkeypatch.setattr(providers, "select_providers", select)
    cfg = runner.BenchConfig(model="resnet18", batch_size=4, image_size=64, dtype="fp32", device="cpu",
                             modes=("inference",), steps=1, warmup=0, providers=["eager", "fused-cpu"],
                             measure_memory=False)
    res = runner.run_bench(cfg, progress=False)
    row = _row(res, "inference", "fused-cpu")
    assert row["status"] == "unavailable" and "inference is not among its modes (train)" in row["reason"]


def test_the_prologue_provider_turns_its_fusion_on_for_its_steps_only():
    import fused_resnet

    p = providers.make_provider("fused-triton+prologue", torch.device("cpu"), torch.float32, explicit=True)
    assert p.backend == "triton" and p.modes == ("train",) and dict(p.fusions) == {"prologue": True}
    assert providers.parse_provider_names("amp,fused-triton+prologue") == ["amp", "fused-triton+prologue"]
    before = fused_resnet.get_fusions()
    with providers.fusions_of(p):
        assert fused_resnet.get_fusions()["prologue"] is True
    assert fused_resnet.get_fusions() == before


# -------------------------------------------------------------- the plan


def test_the_lease_plan_puts_the_figures_within_8_minutes_and_says_why(capsys):
    ctx = plan.Context(python="python3", root=ROOT, work="/tmp/w", cores=16, arch="9.0",
                       wheels=["nvidia_cudnn_frontend-1.32.0-cp312-cp312-manylinux_2_27_x86_64.whl"], site="/tmp/site")
    steps = plan.make_plan(plan.PROFILES["lease"], ctx)
    assert [s.name for s in steps] == ["wheels", "build", "bench-infer", "bench-train", "compile", "smoke-tests",
                                       "cuda-tests", "memcheck"]
    assert plan.pre_test_seconds(steps) < plan.PRE_TEST_LIMIT_S == 480
    assert all(s.estimate.seconds > 0 and s.estimate.basis for s in steps)
    assert all(s.tests for s in steps[5:]) and not any(s.tests for s in steps[:5])
    build = steps[1]
    assert build.env == {"MAX_JOBS": "16", "TORCH_CUDA_ARCH_LIST": "9.0"}
    assert "55 s measured on the H100" in build.estimate.basis
    bench = steps[2].argv
    assert bench[bench.index("--batch-size") + 1] == "256" and bench[bench.index("--dtype") + 1] == "bf16"
    assert "--budget" in bench and "--layers" in bench and "--sequential" in bench
    # The tuning caps hold for the figures, not for the tests (whose autotuner test times every candidate).
    assert steps[2].env["FUSED_RESNET_AUTOTUNE_RUN_S"] == "30" and steps[2].env["FUSED_RESNET_AUTOTUNE_SHAPE_S"] == "10"
    assert not any(k.startswith("FUSED_RESNET_AUTOTUNE") for s in steps[5:] for k in s.env)
    assert plan.PROFILES["lease"].deadline_s <= 600 - 20  # inside the device tool's 10 minutes
    assert check.main(["--plan"]) == 0
    text = capsys.readouterr().out
    assert "est s" in text and "cum s" in text and "Basis of each estimate" in text
    for s in steps:
        assert f"  {s.name}: " in text


def test_cli_errors_name_the_argument(capsys):
    def error_of(fn, argv):
        with pytest.raises(SystemExit) as exc:
            fn(argv)
        assert exc.value.code != 0
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert "--budget: 'x' in 'amp=x' is not a number" in error_of(cli.main, ["bench", "--budget", "amp=x"])
    assert "--budget: unknown provider 'nosuch'" in error_of(cli.main, ["bench", "--budget", "nosuch=3"])
    assert "--budget: seconds must be >= 0" in error_of(cli.main, ["bench", "--budget", "-1"])
    assert "--layer-budget: the default is given twice" in error_of(cli.main, ["bench", "--layer-budget", "1,2"])
    assert "--only: unknown step(s) nosuch" in error_of(check.main, ["--plan", "--only", "build,nosuch"])
    assert "--deadline must be > 0" in error_of(check.main, ["--plan", "--deadline", "0"])
    if not torch.cuda.is_available():
        assert check.main(["--only", "build"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_every_smoke_test_exists():
    for path, name, _, _ in selection.SMOKE:
        with open(os.path.join(ROOT, path)) as f:
            assert f"def {name}(" in f.read(), (path, name)
    k = selection.smoke_k()
    assert all(name in k for _, name, _, _ in selection.SMOKE)


def test_test_outcomes_are_read_from_verbose_output_with_and_without_workers():
    out = "\n".join([
        "tests/test_a.py::test_x[1-bf16] PASSED                [ 10%]",
        "tests/test_a.py::test_y SKIPPED (needs a CUDA GPU)    [ 20%]",
        "[gw0] [ 30%] FAILED tests/test_b.py::test_z[cuda]",
        "[gw1] [ 40%] PASSED tests/test_b.py::test_w",
        "FAILED tests/test_b.py::test_z[cuda] - AssertionError: boom",
        "========= ERROR SUMMARY: 2 errors",
    ])
    got = gsteps.test_outcomes(out)
    assert got["counts"] == {"passed": 2, "skipped": 1, "failed": 1}
    assert got["failed"] == ["tests/test_b.py::test_z[cuda]"] and got["sanitizer_errors"] == 2


def test_record_writer_copies_each_file_out_and_collects_the_log(tmp_path):
    w = record.Writer(str(tmp_path / "rec"), str(tmp_path / "out"))
    w.write_json("record.json", {"a": 1})
    assert json.loads((tmp_path / "out" / "record.json").read_text()) == {"a": 1}
    with open(w.log_path, "a") as f:  # steps append to the log where $OUT collects it
        f.write("step output\n")
    w.copy_out("log.txt")
    assert (tmp_path / "rec" / "log.txt").read_text() == "step output\n"
    with pytest.raises(ValueError, match="not one of"):
        w.write_text("extra.txt", "")


# ----------------------------------------------------- autotune and seeds


@pytest.fixture
def tuning(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from fused_resnet.backends.triton import autotune_budget, autotune_cache, launch

    # tests/conftest.py turns autotuning off; the autouse fixture restores it.
    fused_resnet.set_cache_dir(tmp_path / "cache")
    fused_resnet.set_autotune(True, log=tmp_path / "tune.log")
    monkeypatch.setattr(launch, "_chosen", {})
    monkeypatch.setattr(autotune_cache, "_caches", {})
    autotune_budget.reset()
    yield tmp_path
    autotune_budget.reset()


def _candidates():
    from fused_resnet.backends.triton import autotune_cache, conv_configs
    from fused_resnet.backends.triton.conv2d_fwd import KERNEL_VERSION

    return conv_configs.candidates(90, 2, 64), autotune_cache.make_key(90, "bfloat16-tf32", "bucket", KERNEL_VERSION)


def test_a_spent_shape_budget_keeps_the_best_so_far_and_logs_the_cap(tuning, monkeypatch):
    from fused_resnet.backends.triton import autotune_budget, autotune_cache, launch
    from fused_resnet.backends.triton.conv2d_fwd import KERNEL_VERSION

    fused_resnet.set_autotune(shape_s=0)
    timed = []
    monkeypatch.setattr(launch, "_benchmark", lambda run, cfg: timed.append(cfg.name) or 1.0)
    cands, key = _candidates()
    assert launch.choose_config(key, cands, None) == cands[0] and timed == [cands[0].name]
    (entry,) = autotune_budget.read_log(str(tuning / "tune.log"))
    assert entry["capped"] == "shape budget 0 s" and entry["timed"] == 1 and entry["candidates"] == len(cands)
    assert entry["cached"] is True and autotune_cache.get_cache(KERNEL_VERSION).get(key) == cands[0].name


def test_a_spent_run_budget_takes_the_first_candidate_untimed_and_caches_nothing(tuning, monkeypatch):
    from fused_resnet.backends.triton import autotune_budget, autotune_cache, launch
    from fused_resnet.backends.triton.conv2d_fwd import KERNEL_VERSION

    fused_resnet.set_autotune(run_s=0)
    monkeypatch.setattr(launch, "_benchmark", lambda run, cfg: pytest.fail("timed a candidate"))
    cands, key = _candidates()
    assert launch.choose_config(key, cands, None) == cands[0]
    (entry,) = autotune_budget.read_log(str(tuning / "tune.log"))
    assert entry["timed"] == 0 and entry["cached"] is False and "run budget 0 s" in entry["capped"]
    assert autotune_cache.get_cache(KERNEL_VERSION).get(key) is None  # a later run still tunes it


def test_a_bad_budget_names_the_variable_and_keeps_the_default():
    from fused_resnet import config

    with pytest.warns(RuntimeWarning, match="ignoring .FUSED_RESNET_AUTOTUNE_SHAPE_S='soon'"):
        config.load_environment({"FUSED_RESNET_AUTOTUNE_SHAPE_S": "soon"})
    assert config.get("autotune_shape_s") is None
    with pytest.raises(ValueError, match="`shape_s` must be seconds >= 0 or None"):
        fused_resnet.set_autotune(shape_s=-1)


def test_tuned_configs_go_into_the_record_and_seed_the_next_lease_of_that_gpu(tuning):
    from fused_resnet.backends.triton import autotune_cache
    from fused_resnet.backends.triton.conv2d_fwd import KERNEL_VERSION

    key = f"sm90|bfloat16-tf32|bucket|{KERNEL_VERSION}"
    old = "sm90|bfloat16-tf32|bucket|conv2d_fwd-v0"
    first = tuning / "first"
    autotune_cache.AutotuneCache(first / f"autotune-{KERNEL_VERSION}.json").put_many({key: "m128", old: "m64"})
    (tuning / "tune.log").write_text(json.dumps({"key": key, "timed": 5, "seconds": 1.5, "capped": None}) + "\n")
    results = tuning / "results"
    for name, device in (("2026-12-01-h100", H100), ("2026-12-02-a100", "NVIDIA A100-SXM4-80GB")):
        (results / name).mkdir(parents=True)
        summary = tuned_configs.export(str(first), str(tuning / "tune.log"), str(results / name / "autotune.json"),
                                       device, "9.0")
    assert summary["entries"] == 2 and summary["tuned_keys"] == 1 and summary["tuning_seconds"] == 1.5
    second = tuning / "second"
    seeded = tuned_configs.seed(str(second), str(results), H100)
    assert seeded == {"from": "results/2026-12-01-h100/autotune.json", "entries": 1, "other_kernel_versions": 1}
    assert autotune_cache.AutotuneCache(second / f"autotune-{KERNEL_VERSION}.json").entries() == {key: "m128"}
    assert tuned_configs.seed(str(second), str(results), "NVIDIA H200") is None


def test_the_commit_comes_from_the_environment_where_git_has_none(monkeypatch):
    from fused_resnet.tools.bench import environment

    def no_git(*args, **kwargs):
        raise OSError("no git here")

    monkeypatch.setattr(environment.subprocess, "run", no_git)
    monkeypatch.setenv(environment.COMMIT_ENV, "abc123-dirty")
    assert environment.git_commit() == "abc123-dirty"
    monkeypatch.delenv(environment.COMMIT_ENV)
    assert environment.git_commit() is None


def test_merge_keeps_what_a_later_run_did_not_redo():
    old = {"steps": [{"step": "bench-train", "git_commit": "aaa"}, {"step": "smoke-tests", "git_commit": "aaa"}],
           "bench_train": {"results": [1]}, "layers": {"layers": []}, "tests": {"smoke-tests": {"counts": {}}}}
    new = {"steps": [{"step": "cuda-tests", "git_commit": "bbb"}], "bench_train": None,
           "tests": {"cuda-tests": {"counts": {"passed": 3}}}}
    merged = record.merge(old, new, ["bench-train", "smoke-tests", "cuda-tests"])
    assert [s["step"] for s in merged["steps"]] == ["bench-train", "smoke-tests", "cuda-tests"]
    assert merged["bench_train"] == {"results": [1]} and merged["layers"] == {"layers": []}
    assert set(merged["tests"]) == {"smoke-tests", "cuda-tests"}
    assert merged["note"] == "steps of this record ran at different commits: aaa, bbb"
    assert record.merge(None, new, []) is new


def test_layers_command_times_each_unit_and_prints_the_choice(tmp_path, capsys):
    path, choice = tmp_path / "layers.json", tmp_path / "choice.json"
    assert cli.main(["layers", "--model", "resnet18", "--batch-size", "2", "--image-size", "32", "--device", "cpu",
                     "--backends", "cpu", "--mode", "inference", "--steps", "1", "--warmup", "0", "--quiet",
                     "--json", str(path), "--auto-choice", str(choice)]) == 0
    out = capsys.readouterr().out
    rec = json.loads(path.read_text())
    assert rec["complete"] and {e["mode"] for e in rec["layers"]} == {"inference"}
    assert sum(e["count"] for e in rec["layers"]) == 20  # resnet18's conv units
    assert json.loads(choice.read_text())["classes"]["inference/stem/7x7/s2"]["backend"] == "cpu"
    assert "inference/last/3x3/s1" in out and "auto choice" in out
    with pytest.raises(SystemExit):
        cli.main(["layers", "--backends", "tensorrt"])
    assert "--backends: unknown backend 'tensorrt'" in capsys.readouterr().err


# ------------------------------------------------- layer classes, choice


def test_layer_classes_of_resnet50():
    units = layers.network_units("resnet50", 256, 224)
    roles = [u.role for u in units]
    assert len(units) == 53 and roles.count("stem") == 1 and roles.count("downsample") == 4
    assert roles.count("last") == 16 and roles.count("inner") == 32
    assert len(layers.distinct_units(units)) == 24
    stem = units[0]
    assert stem.in_shape == (256, 3, 224, 224) and stem.out_shape == (256, 64, 112, 112)
    assert layers.layer_class("train", stem.role, stem.kernel, stem.stride) == "train/stem/7x7/s2"
    classes = {layers.layer_class("inference", u.role, u.kernel, u.stride) for u in units}
    assert classes == {"inference/stem/7x7/s2", "inference/inner/1x1/s1", "inference/inner/3x3/s1",
                       "inference/inner/3x3/s2", "inference/last/1x1/s1", "inference/downsample/1x1/s1",
                       "inference/downsample/1x1/s2"}
    assert layers.parse_layer_class("train/inner/3x3/s2") == {"mode": "train", "role": "inner", "kernel": (3, 3),
                                                              "stride": (2, 2)}
    with pytest.raises(ValueError, match="`role` must be one of"):
        layers.layer_class("train", "middle", 3, 1)
    with pytest.raises(ValueError, match="not a layer class"):
        layers.parse_layer_class("train/inner/3x3")


def _layer(mode, cls, name, count, **results):
    return {"mode": mode, "class": cls, "name": name, "names": [name] * count, "count": count,
            "results": {b: ({"status": "ok", "ms": v} if isinstance(v, float) else v) for b, v in results.items()}}


def test_auto_choice_sums_each_class_and_only_complete_backends_can_win():
    rec = {"config": {"model": "resnet50", "batch_size": 256, "dtype": "bf16"},
           "environment": {"device_name": H100, "git_commit": "abc"},
           "layers": [
               _layer("inference", "inference/inner/3x3/s1", "layer1.0.conv2", 2, eager=3.0, cuda=1.0, triton=0.8,
                      cudnn=0.9),
               _layer("inference", "inference/inner/3x3/s1", "layer2.1.conv2", 1, eager=3.0, cuda=2.0, triton=2.5,
                      cudnn={"status": "error", "reason": "boom"}),
               _layer("train", "train/stem/7x7/s2", "conv1", 1, eager=9.0, cuda=5.0,
                      triton={"status": "over budget", "reason": "spent"}),
               _layer("train", "train/last/1x1/s1", "layer1.0.conv3", 3, eager=1.0,
                      cuda={"status": "unavailable", "reason": "no GPU"}),
           ]}
    choice = auto_choice.derive(rec)
    assert choice["candidates"] == ["cuda", "triton", "cudnn"] and choice["default"] == "cuda"
    inner = choice["classes"]["inference/inner/3x3/s1"]
    # cuda: 2 x 1.0 + 2.0 = 4.0 beats triton: 2 x 0.8 + 2.5 = 4.1; cudnn failed one layer.
    assert inner["backend"] == "cuda" and inner["ms"] == {"cuda": 4.0, "triton": 4.1}
    assert inner["speedup_vs_next"] == pytest.approx(4.1 / 4.0, abs=1e-4) and inner["eager_ms"] == 9.0
    assert inner["layers"] == 3 and inner["incomplete"] == {"cudnn": "layer2.1.conv2: error: boom"}
    stem = choice["classes"]["train/stem/7x7/s2"]
    assert stem["backend"] == "cuda" and stem["speedup_vs_next"] is None and "over budget" in stem["incomplete"]["triton"]
    assert choice["classes"]["train/last/1x1/s1"]["backend"] is None
    assert choice["source"]["device_name"] == H100 and choice["source"]["git_commit"] == "abc"
    assert auto_choice.derive(rec, candidates=["triton"])["classes"]["inference/inner/3x3/s1"]["backend"] == "triton"
    with pytest.raises(ValueError, match="no 'layers' list"):
        auto_choice.derive({"results": []})
    with pytest.raises(ValueError, match="not a layer class"):
        auto_choice.derive({"layers": [_layer("train", "train/odd", "x", 1, cuda=1.0)]})
