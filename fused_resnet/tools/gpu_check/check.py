"""`make gpu-check` (python -m fused_resnet.tools.gpu_check): the steps of a
profile (plan.py) in order, each in its own process under its own limit,
the record (record.py) rewritten after each one."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import tempfile
import time

from . import plan as _plan
from . import record as _record
from . import steps as _steps
from . import tuned_configs

# The repository: fused_resnet/tools/gpu_check/check.py, three folders up.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DESCRIPTION = """`make gpu-check`: one prepared command that turns a short GPU lease into
network-level figures, most valuable first, each on disk the moment it
exists.

    python -m fused_resnet.tools.gpu_check --plan          # the steps, estimated seconds, their basis
    python -m fused_resnet.tools.gpu_check                 # the lease profile (the default)
    python -m fused_resnet.tools.gpu_check --rehearsal     # the same path on the CPU, tiny (make test runs it)

Steps (lease profile; plan.py): install the carried wheels (.whl/), build
the extension for this GPU's architecture with a job per core (the cudnn
backend included), `fused-resnet bench` on resnet50 bf16 channels_last
batch 256 for inference and then training (eager AMP, fused-cuda,
fused-triton, fused-triton with the BN prologue in training, fused-cudnn;
each conv unit then timed alone per backend), torch.compile beside the
fused backends; then tests with the time left (one fast test per op and
backend first), then compute-sanitizer memcheck on the CUDA BatchNorm
kernels. Each step has its own time limit and each provider its own
budget; a provider that runs out is recorded as such and the next runs.

Record (record.py): benchmarks/results/<date>-<gpu>/ (record.json,
summary.md, log.txt, autotune.json, auto_choice.json), copied to $OUT.
The Triton autotune cache starts from the newest earlier record of the same
GPU (tuned_configs.py). See benchmarks/README.md for the device call.
"""

# Kept from a filling step (the CUDA tests) for the steps after it, beyond
# their estimates: each process's start and the record's last writes.
SLACK_S = 10.0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fused_resnet.tools.gpu_check", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    prof = ap.add_mutually_exclusive_group()
    prof.add_argument("--profile", choices=sorted(_plan.PROFILES), default=None,
                      help="lease (default), full or rehearsal (see fused_resnet/tools/gpu_check/plan.py)")
    for name in sorted(_plan.PROFILES):
        prof.add_argument(f"--{name}", dest="profile", action="store_const", const=name,
                          help=f"same as --profile {name}")
    ap.add_argument("--plan", action="store_true", help="print the steps with their estimated seconds and exit")
    ap.add_argument("--only", help="comma-separated steps to run (the others are left out)")
    ap.add_argument("--skip", help="comma-separated steps to leave out")
    ap.add_argument("--deadline", type=float, help="seconds the whole check may take (default: the profile's)")
    ap.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"),
                    help="where <date>-<gpu>/ goes (default benchmarks/results)")
    ap.add_argument("--out", default=os.environ.get("OUT") or None,
                    help="a folder that gets a copy of every record file as it is written (default $OUT)")
    ap.add_argument("--wheels-dir", default=os.path.join(ROOT, ".whl"), help="wheels to install first (.whl/)")
    ap.add_argument("--site", default="/tmp/site", help="where the wheels are installed (pip --target)")
    ap.add_argument("--work", help="scratch folder (default: a new temporary one)")
    return ap


def _select(ap: argparse.ArgumentParser, steps: list, only: str | None, skip: str | None) -> list:
    names = [s.name for s in steps]
    for opt, flag, keep in ((only, "--only", True), (skip, "--skip", False)):
        if opt:
            chosen = [n.strip() for n in opt.split(",") if n.strip()]
            unknown = [n for n in chosen if n not in names]
            if unknown:
                ap.error(f"{flag}: unknown step(s) {', '.join(unknown)}; expected {', '.join(names)}")
            steps = [s for s in steps if (s.name in chosen) == keep]
    return steps


def _arch() -> str:
    import torch

    if not torch.cuda.is_available():
        return ""
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    profile = _plan.PROFILES[args.profile or "lease"]
    if args.deadline is not None:
        if not args.deadline > 0:
            ap.error(f"--deadline must be > 0 seconds, got {args.deadline:g}")
        profile = _plan.Profile(**{**profile.__dict__, "deadline_s": args.deadline})
    if args.plan:
        # Estimated for the lease's GPU, an H100 (sm 9.0), whatever runs this.
        ctx = _plan.Context.here(ROOT, args.work or "<scratch>", "9.0" if profile.device == "cuda" else "",
                                 args.wheels_dir, args.site)
        print(_plan.format_plan(profile, _select(ap, _plan.make_plan(profile, ctx), args.only, args.skip)))
        return 0
    arch = _arch()
    if profile.device == "cuda" and not arch:
        _select(ap, _plan.make_plan(profile, _plan.Context.here(ROOT, "", "", args.wheels_dir, args.site)),
                args.only, args.skip)  # argument errors first
        print(f"gpu-check: profile {profile.name} needs a CUDA GPU and none is visible "
              "(torch.cuda.is_available() is False); --rehearsal runs the same steps on the CPU", file=sys.stderr)
        return 2
    work = args.work or tempfile.mkdtemp(prefix="fused_resnet_gpu_check_")
    os.makedirs(work, exist_ok=True)
    ctx = _plan.Context.here(ROOT, work, arch, args.wheels_dir, args.site)
    steps = _select(ap, _plan.make_plan(profile, ctx), args.only, args.skip)
    return run(profile, ctx, steps, args.results_dir, args.out)


def _environment(profile, ctx) -> dict:
    from ..bench import environment

    env = environment.describe(profile.device)
    env.update(build_arch=ctx.arch or None, max_jobs=ctx.cores)
    return env


def run(profile, ctx, steps: list, results_dir: str, out: str | None, clock=time.monotonic) -> int:
    t_start = clock()
    env = _environment(profile, ctx)
    date = _dt.datetime.now()
    directory = os.path.join(results_dir, f"{date:%Y-%m-%d}-{_record.slug(env['device_name'])}")
    writer = _record.Writer(directory, out)
    order = [s.name for s in steps]
    old = _record.load(writer.path("record.json"))
    cache_dir = _plan.cache_dir(ctx)
    child_env = {**profile.env, "PYTHONUNBUFFERED": "1", "FUSED_RESNET_CACHE_DIR": cache_dir}
    seeded = tuned_configs.seed(cache_dir, results_dir, env["device_name"], exclude=directory)
    rec = {
        "schema": 1, "date": date.isoformat(timespec="seconds"), "profile": profile.name,
        "deadline_s": profile.deadline_s, "environment": env,
        "plan": [{"step": s.name, "what": s.what, "estimate_s": round(s.estimate.seconds, 1),
                  "basis": s.estimate.basis, "cap_s": s.cap_s, "tests": s.tests} for s in steps],
        "plan_before_tests_s": round(_plan.pre_test_seconds(steps), 1),
        "steps": [], "autotune": {"seeded": seeded} if seeded else None,
    }

    def save() -> None:
        merged = _record.merge(old, rec, order)
        writer.write_json("record.json", merged)
        writer.write_text("summary.md", _record.guarded(_record.summary, merged))
        writer.copy_out("log.txt")

    save()
    print(f"gpu-check ({profile.name}): {len(steps)} steps, record in {directory}"
          + (f", copied to {out}" if out else ""), flush=True)
    if seeded:
        print(f"   autotune cache seeded with {seeded['entries']} configs from {seeded['from']}", flush=True)
    bad = []
    for i, step in enumerate(steps):
        elapsed = clock() - t_start
        timeout = step.cap_s
        if profile.deadline_s is not None:
            left = profile.deadline_s - elapsed
            if step.fill:
                left -= sum(s.estimate.seconds for s in steps[i + 1:]) + SLACK_S
            timeout = min(timeout, left)
        if timeout < step.min_s or timeout <= 0:
            entry = {"step": step.name, "status": f"not run: {max(timeout, 0):.0f} s left, it needs {step.min_s:.0f}",
                     "exit_code": None, "seconds": 0.0, "timeout_s": round(max(timeout, 0), 1),
                     "estimate_s": round(step.estimate.seconds, 1), "output_tail": ""}
        else:
            print(f"== {step.name} (limit {timeout:.0f} s, estimate {step.estimate.seconds:.0f} s): {step.what}",
                  flush=True)
            moved = _move_extension_aside(ctx.root) if step.name == "build" and profile.build else []
            entry = _steps.run_step(step, timeout, ctx.root, child_env, writer.log_path)
            _restore_extension(moved)
        output = entry.pop("_output", "")
        entry["git_commit"] = env.get("git_commit")
        entry["started_s"] = round(elapsed, 1)
        rec["steps"].append(entry)
        try:
            _collect(step, entry, output, rec, ctx, child_env, writer, env, seeded)
        except Exception as exc:  # noqa: BLE001 - what the step left is in the log; the check goes on
            entry["collect_error"] = f"{type(exc).__name__}: {exc}"
        print(f"   {entry['status']} in {entry['seconds']:.0f} s (at {clock() - t_start:.0f} s)", flush=True)
        if entry["status"] != "ok":
            bad.append(step.name)
        save()
    print(_record.guarded(_summary_lines, rec))
    print(f"wrote {', '.join(n for n in _record.FILES if os.path.exists(writer.path(n)))} in {directory}"
          + (f" and {out}" if out else ""))
    if bad:
        print(f"gpu-check: not ok: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


def _move_extension_aside(root: str) -> list[tuple[str, str]]:
    """Rename fused_resnet/_C*.so before the build: this process has it
    mapped (importing fused_resnet.tools.gpu_check loads it), and the build copies
    the new one over that path; writing into the mapped file would crash
    this process. Renamed, the mapping keeps the old file alive and the
    build writes a new one."""
    import glob

    moved = []
    for path in glob.glob(os.path.join(root, "fused_resnet", "_C*.so")):
        aside = f"{path}.{os.getpid()}.old"
        os.replace(path, aside)
        moved.append((path, aside))
    return moved


def _restore_extension(moved: list[tuple[str, str]]) -> None:
    """Put a renamed extension back where the build wrote none (it failed
    before the copy); drop it where a new one is in place."""
    for path, aside in moved:
        if os.path.exists(path):
            os.remove(aside)
        else:
            os.replace(aside, path)


def _collect(step, entry: dict, output: str, rec: dict, ctx, child_env: dict, writer, env: dict,
             seeded: dict | None) -> None:
    """What the step produced, into the record (whatever it left, also when
    it failed or was killed: its JSON holds every row that finished)."""
    from ..bench import auto_choice
    from ..bench.layers import merge_records

    if step.name == "wheels" and entry["status"] == "ok" and ctx.wheels:
        # The later steps import what the wheels hold (the frontend headers for
        # the build) from there.
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (ctx.site, os.environ.get("PYTHONPATH")) if p)
    if step.result and step.output:
        data = _record.load(step.output)
        if data is not None:
            layers = data.pop("layers", None)
            rec[step.result] = data
            if layers:
                rec["layers"] = merge_records(rec.get("layers"), layers)
                choice = auto_choice.derive(rec["layers"])
                choice["source"]["date"] = rec["date"]
                writer.write_json("auto_choice.json", choice)
        rec["autotune"] = tuned_configs.export(_plan.cache_dir(ctx), _plan.autotune_log(ctx),
                                               writer.path("autotune.json"), env["device_name"],
                                               env.get("compute_capability"), seeded)
        writer.copy_out("autotune.json")
    if step.tests:
        rec.setdefault("tests", {})[step.name] = _steps.test_outcomes(output)


def _summary_lines(rec: dict) -> str:
    """The short table the device tool's reply ends with."""
    lines = ["", "step          status                          seconds"]
    for s in rec["steps"]:
        lines.append(f"{s['step']:<13} {s['status'][:31]:<31} {s['seconds']:>7.0f}")
    for key in ("bench_inference", "bench_train", "bench_compile"):
        for r in (rec.get(key) or {}).get("results", []):
            if r.get("images_per_s"):
                ratios = ", ".join(f"{v:.2f}x {k[9:]}" for k, v in r.items()
                                   if k.startswith("ratio_to_") and v is not None)
                lines.append(f"  {key[6:]:<9} {r['mode']:<9} {r['provider']:<22} {r['images_per_s']:>10.1f} img/s  "
                             f"{ratios}  {r['status']}")
    for t in _record.targets(rec):
        lines.append(f"  target: {t['target']}: " + ("no figure" if t["met"] is None else
                                                     f"{t['provider']} {t['images_per_s']} img/s, "
                                                     f"{'met' if t['met'] else 'not met'}"))
    return "\n".join(lines)
