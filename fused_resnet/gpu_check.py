"""`make gpu-check`: everything the GPU machine should run, in one command,
each step in its own process under a 10-minute limit, results recorded in
benchmarks/results/<date>-<gpu>.json and .md.

Steps (python -m fused_resnet.gpu_check --list):
  build        python setup.py build_ext --inplace (ninja), always for
               TORCH_CUDA_ARCH_LIST="8.0;9.0" (the GPU image sets 9.0a)
  info         fused-resnet info
  cuda-tests   pytest tests -k "cuda and not large_tensors" (the CUDA tests;
               the rest runs in CI), over pytest-xdist workers when installed
  cuda-large   pytest tests/test_large_tensors.py -k cuda, one process (its
               tensors take tens of GiB; beside other workers they ran out)
  bench-infer  fused-resnet bench --mode inference (GPU defaults)
  bench-train  fused-resnet bench --mode train (GPU defaults)
  pytest-bench pytest benchmarks/ --benchmark-json (GPU sizes)

Run a subset with --only / --skip; a step that fails or times out is
recorded as such and the others still run. Runs on the same day and device
add to one record: a step run again replaces its earlier entry, so the steps
can be spread over several shorter commands (the GPU machine allows 10
minutes a command). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("build", "info", "cuda-tests", "cuda-large", "bench-infer", "bench-train", "pytest-bench")
# The project's GPU targets (issue: built for sm_80 and sm_90), whatever the
# machine's environment says.
BUILD_ARCHS = "8.0;9.0"


def _xdist_args() -> list[str]:
    try:
        import xdist  # noqa: F401
    except ImportError:
        return []
    return ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]


def _commands(work: str, bench_args: list[str], pytest_args: list[str]) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "build": [py, "setup.py", "-q", "build_ext", "--inplace"],
        "info": [py, "-m", "fused_resnet", "info"],
        "cuda-tests": [py, "-m", "pytest", "tests", "-q", "-rfEs", "-k", "cuda and not large_tensors",
                       "-p", "no:cacheprovider", *_xdist_args()],
        "cuda-large": [py, "-m", "pytest", "tests/test_large_tensors.py", "-q", "-rfEs", "-k", "cuda",
                       "-p", "no:cacheprovider"],
        "bench-infer": [py, "-m", "fused_resnet", "bench", "--mode", "inference", "--quiet",
                        "--json", os.path.join(work, "bench-inference.json"), *bench_args],
        "bench-train": [py, "-m", "fused_resnet", "bench", "--mode", "train", "--quiet",
                        "--json", os.path.join(work, "bench-train.json"), *bench_args],
        "pytest-bench": [py, "-m", "pytest", "benchmarks", "-q", "-rs", "-p", "no:cacheprovider",
                         "--benchmark-json", os.path.join(work, "pytest-benchmark.json"), *pytest_args],
    }


def _run(name: str, cmd: list[str], timeout: int, env: dict[str, str] | None = None) -> dict:
    print(f"== {name}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env=None if env is None else {**os.environ, **env})
        rc, out = p.returncode, p.stdout + p.stderr
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired as exc:
        rc = None
        out = ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")) + (
            (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or ""))
        status = f"timed out after {timeout} s"
    dt = time.time() - t0
    print(f"   {status} in {dt:.0f} s", flush=True)
    tail = out[-6000:]
    if rc != 0:
        print(tail[-3000:], flush=True)
    return {"step": name, "command": cmd, "env": env or {}, "status": status, "exit_code": rc,
            "seconds": round(dt, 1), "output_tail": tail}


def merge_records(old: dict | None, new: dict) -> dict:
    """new added to an earlier record of the same day and device: steps run
    again replace their earlier entries (others are kept, in step order), and
    result sections the new run did not produce are kept from the old one."""
    if not old or "steps" not in old:
        return new
    merged = dict(new)
    ran = {s["step"] for s in new["steps"]}
    steps = [s for s in old.get("steps", []) if s["step"] not in ran] + new["steps"]
    order = {name: i for i, name in enumerate(STEPS)}
    merged["steps"] = sorted(steps, key=lambda s: order.get(s["step"], len(order)))
    for key in ("bench_inference", "bench_train", "pytest_benchmark"):
        if merged.get(key) is None:
            merged[key] = old.get(key)
    commits = sorted({str(s.get("git_commit")) for s in merged["steps"]})
    if len(commits) > 1:
        merged["note"] = "steps of this record ran at different commits: " + ", ".join(commits)
    return merged


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def _load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _markdown(record: dict) -> str:
    from .bench import report

    env = record["environment"]
    lines = [f"# gpu-check {record['date']} on {env.get('device_name')}", "",
             "| | |", "|---|---|"]
    for k in ("device_name", "compute_capability", "gpu_memory_gib", "driver", "cuda_runtime", "cudnn", "torch",
              "triton", "torchvision", "python", "fused_resnet", "git_commit"):
        lines.append(f"| {k} | {env.get(k)} |")
    if record.get("note"):
        lines += ["", f"Note: {record['note']}."]
    lines += ["", "## Steps", "", "| step | status | seconds | commit |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s.get('git_commit')} |" for s in record["steps"]]
    for key in ("bench_inference", "bench_train"):
        if record.get(key):
            lines += ["", f"## fused-resnet bench ({key.split('_')[1]})", "", report.format_markdown(record[key])]
    pb = record.get("pytest_benchmark")
    if pb:
        lines += ["", "## pytest benchmarks/ (median ms, extra_info)", "", "| group | name | median ms | extra |",
                  "|---|---|---|---|"]
        for b in sorted(pb.get("benchmarks", []), key=lambda b: (b.get("group") or "", b["name"])):
            extra = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in b.get("extra_info", {}).items())
            lines.append(f"| {b.get('group')} | {b['name']} | {b['stats']['median'] * 1e3:.3f} | {extra} |")
    for s in record["steps"]:
        if s["status"] != "ok":
            lines += ["", f"## {s['step']}: {s['status']} (output tail)", "", "```", s["output_tail"][-3000:], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fused_resnet.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help=f"comma-separated steps to run ({', '.join(STEPS)})")
    ap.add_argument("--skip", help="comma-separated steps to skip")
    ap.add_argument("--timeout", type=int, default=540, help="seconds per step (default 540)")
    ap.add_argument("--bench-args", default="", help="extra arguments for `fused-resnet bench`")
    ap.add_argument("--pytest-args", default="", help="extra arguments for `pytest benchmarks/`")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--allow-no-gpu", action="store_true", help="run anyway without a GPU (to test this script)")
    ap.add_argument("--list", action="store_true", help="print the steps and exit")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(STEPS))
        return 0
    chosen = list(STEPS)
    for opt, keep in ((args.only, True), (args.skip, False)):
        if opt:
            names = [n.strip() for n in opt.split(",") if n.strip()]
            unknown = [n for n in names if n not in STEPS]
            if unknown:
                ap.error(f"unknown step(s) {', '.join(unknown)}; expected {', '.join(STEPS)}")
            chosen = [s for s in chosen if (s in names) == keep]

    import torch

    if not torch.cuda.is_available() and not args.allow_no_gpu:
        print("gpu-check: no CUDA GPU is visible (torch.cuda.is_available() is False); it is meant for the GPU "
              "machine (--allow-no-gpu to run it anyway)", file=sys.stderr)
        return 2
    from .bench import environment

    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment.describe(device)
    work = tempfile.mkdtemp(prefix="fused_resnet_gpu_check_")
    cmds = _commands(work, shlex.split(args.bench_args), shlex.split(args.pytest_args))
    envs = {"build": {"TORCH_CUDA_ARCH_LIST": BUILD_ARCHS}}
    steps = [_run(name, cmds[name], args.timeout, envs.get(name)) for name in chosen]
    for step in steps:
        step["git_commit"] = env.get("git_commit")
    date = _dt.datetime.now().strftime("%Y-%m-%d")
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"{date}-{_slug(env['device_name'])}")
    record = merge_records(_load(base + ".json"), {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "environment": env,
        "steps": steps,
        "bench_inference": _load(os.path.join(work, "bench-inference.json")),
        "bench_train": _load(os.path.join(work, "bench-train.json")),
        "pytest_benchmark": _load(os.path.join(work, "pytest-benchmark.json")),
    })
    with open(base + ".json", "w") as f:
        json.dump(record, f, indent=2, default=str)
    with open(base + ".md", "w") as f:
        f.write(_markdown(record))
    print(f"wrote {base}.json and {base}.md")
    bad = [s["step"] for s in steps if s["status"] != "ok"]
    if bad:
        print(f"gpu-check: not ok: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
