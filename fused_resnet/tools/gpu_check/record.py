"""The check's record and where it goes.

One directory per day and GPU, benchmarks/results/<date>-<gpu>/, holding at
most five files, each rewritten the moment a step adds to it and copied to
$OUT when that is set (the device tool returns at most 8 files from $OUT,
no deeper than two folders):

  record.json       everything: environment, plan, each step's status,
                    seconds and output tail, the bench results (network rows
                    and per-layer timings), test outcomes, autotune summary
  summary.md        the same as tables, to read and to quote
  log.txt           every step's full output, appended as it is written
  autotune.json     the Triton conv's tuned configs and what tuning cost
                    (tuned_configs.py); a later lease seeds from it
  auto_choice.json  the fastest backend per layer class
                    (fused_resnet/tools/bench/auto_choice.py)

A second run on the same day and GPU adds to the same record: a step run
again replaces its earlier entry (merge()).
"""

from __future__ import annotations

import json
import os
import re
import shutil

FILES = ("record.json", "summary.md", "log.txt", "autotune.json", "auto_choice.json")
RESULT_KEYS = ("bench_inference", "bench_train", "bench_compile", "layers", "tests", "autotune")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


class Writer:
    """Writes the record's files into `directory` and copies each to
    `mirror` ($OUT) right after; the log is written where the device tool
    collects it ($OUT when set), and copied back at each step's end."""

    def __init__(self, directory: str, mirror: str | None = None):
        self.directory = os.path.abspath(directory)
        self.mirror = os.path.abspath(mirror) if mirror else None
        if self.mirror == self.directory:
            self.mirror = None
        os.makedirs(self.directory, exist_ok=True)
        if self.mirror:
            os.makedirs(self.mirror, exist_ok=True)

    @property
    def log_path(self) -> str:
        return os.path.join(self.mirror or self.directory, "log.txt")

    def path(self, name: str) -> str:
        if name not in FILES:
            raise ValueError(f"record file {name!r} is not one of {', '.join(FILES)}")
        return os.path.join(self.directory, name)

    def write_json(self, name: str, data: dict) -> None:
        self._write(name, json.dumps(data, indent=1, default=str) + "\n")

    def write_text(self, name: str, text: str) -> None:
        self._write(name, text)

    def _write(self, name: str, text: str) -> None:
        path = self.path(name)
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        self.copy_out(name)

    def copy_out(self, name: str) -> None:
        """The file (written in the record directory) to the mirror; the log
        (written in the mirror) back to the record directory."""
        if not self.mirror:
            return
        src, dst = os.path.join(self.directory, name), os.path.join(self.mirror, name)
        if name == "log.txt":
            src, dst = dst, src
        if os.path.exists(src):
            tmp = f"{dst}.tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)


def load(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def merge(old: dict | None, new: dict, order: list[str]) -> dict:
    """`new` added to an earlier record of the same day and GPU: steps run
    again replace their entries (the others are kept, in plan order), and
    result sections the new run did not produce are kept from the old one."""
    if not old or "steps" not in old:
        return new
    merged = dict(new)
    ran = {s["step"] for s in new["steps"]}
    rank = {name: i for i, name in enumerate(order)}
    steps = [s for s in old["steps"] if s["step"] not in ran] + new["steps"]
    merged["steps"] = sorted(steps, key=lambda s: rank.get(s["step"], len(rank)))
    for key in RESULT_KEYS:
        if merged.get(key) is None and old.get(key) is not None:
            merged[key] = old[key]
    if isinstance(old.get("tests"), dict) and isinstance(new.get("tests"), dict):
        merged["tests"] = {**old["tests"], **new["tests"]}  # per test step
    commits = sorted({str(s.get("git_commit")) for s in merged["steps"]})
    if len(commits) > 1:
        merged["note"] = "steps of this record ran at different commits: " + ", ".join(commits)
    return merged


# ---------------------------------------------------------------- targets

# The targets on an H100 SXM, resnet50, bf16, channels_last, batch 256.
TARGETS = (
    ("train", "amp", 1.5, 5000.0, "training >= 1.5x eager AMP and >= 5,000 images/s"),
    ("inference", "compile", 1.2, 25000.0, "inference >= 1.2x torch.compile with freezing and >= 25,000 images/s"),
)


def _rows(record: dict) -> list[dict]:
    out = []
    for key in ("bench_inference", "bench_train", "bench_compile"):
        out += [dict(r, source=key) for r in (record.get(key) or {}).get("results", [])]
    return out


def targets(record: dict) -> list[dict]:
    """Per target: the fastest fused row of its mode and where it stands
    against the baseline measured beside it (same bench run)."""
    out = []
    for mode, base, ratio, floor, text in TARGETS:
        best = None
        for r in _rows(record):
            if (r["mode"] == mode and r.get("kind") == "fused" and r.get("images_per_s")
                    and r.get(f"ratio_to_{base}") and r.get("status") in ("ok", "over budget")):
                if best is None or r["images_per_s"] > best["images_per_s"]:
                    best = r
        if best is None:
            out.append({"target": text, "met": None, "why": f"no fused {mode} row beside a {base} row"})
            continue
        got = best[f"ratio_to_{base}"]
        out.append({"target": text, "provider": best["provider"], "source": best["source"],
                    "images_per_s": round(best["images_per_s"], 1), f"ratio_to_{base}": round(got, 3),
                    "met": bool(got >= ratio and best["images_per_s"] >= floor)})
    return out


# --------------------------------------------------------------- markdown


def guarded(fn, data) -> str:
    """A section of the summary, or why it could not be written: the summary
    is for reading, and a result it cannot format (a row cut short) must not
    cost the record."""
    try:
        return fn(data)
    except Exception as exc:  # noqa: BLE001 - any formatting failure is reported in place
        return f"(could not format this section: {type(exc).__name__}: {exc}; record.json has the data)"


def summary(record: dict) -> str:
    from ..bench import report
    from ..bench.auto_choice import derive, format_choice

    env = record.get("environment", {})
    lines = [f"# gpu-check {record.get('date')} on {env.get('device_name')} (profile {record.get('profile')})", "",
             "| | |", "|---|---|"]
    for k in ("device_name", "compute_capability", "gpu_memory_gib", "driver", "cuda_runtime", "cudnn", "torch",
              "triton", "torchvision", "python", "cpu_count", "build_arch", "git_commit"):
        lines.append(f"| {k} | {env.get(k)} |")
    if record.get("note"):
        lines += ["", f"Note: {record['note']}."]
    lines += ["", "## Steps", "", "| step | status | seconds | estimate s | limit s |", "|---|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s.get('seconds')} | {s.get('estimate_s')} | {s.get('timeout_s')} |"
              for s in record.get("steps", [])]
    tg = targets(record)
    if any(t.get("met") is not None for t in tg):
        lines += ["", "## Targets", "", "| target | fastest fused | images/s | vs baseline | met |", "|---|---|---|---|---|"]
        for t in tg:
            ratio = t.get("ratio_to_amp", t.get("ratio_to_compile"))
            lines.append(f"| {t['target']} | {t.get('provider', '-')} | {t.get('images_per_s', '-')} | "
                         f"{'-' if ratio is None else f'{ratio:.2f}x'} | "
                         f"{'-' if t['met'] is None else ('yes' if t['met'] else 'no')} |")
    for key, title in (("bench_inference", "inference"), ("bench_train", "training"),
                       ("bench_compile", "torch.compile beside the fused backends")):
        res = record.get(key)
        if res and res.get("results"):
            done = "" if res.get("complete", True) else " (cut short: the rows that finished)"
            lines += ["", f"## fused-resnet bench, {title}{done}", "", guarded(report.format_markdown, res)]
    layers = record.get("layers")
    if layers and layers.get("layers"):
        lines += ["", "## Per layer (conv units), summed over the network", "",
                  "| mode | backend | ms | every layer timed |", "|---|---|---|---|"]
        for mode, per in layers.get("totals", {}).items():
            for b, t in per.items():
                lines.append(f"| {mode} | {b} | {t['ms']:.2f} | {'yes' if t['complete'] else 'no'} |")
        lines += ["", "```", guarded(lambda r: format_choice(derive(r)), layers), "```"]
    at = record.get("autotune")
    if at:
        lines += ["", "## Triton autotuning", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in at.items()]
    tests = record.get("tests") or {}
    if tests:
        lines += ["", "## Tests", "", "| step | outcomes | failed |", "|---|---|---|"]
        for name, t in tests.items():
            counts = ", ".join(f"{k} {v}" for k, v in sorted(t.get("counts", {}).items())) or "none seen"
            failed = ", ".join(t.get("failed", [])[:10]) + (" ..." if t.get("failed_total", 0) > 10 else "")
            lines.append(f"| {name} | {counts} | {failed or '-'} |")
    for s in record.get("steps", []):
        if s["status"] != "ok":
            lines += ["", f"## {s['step']}: {s['status']} (output tail)", "", "```", s["output_tail"][-3000:], "```"]
    return "\n".join(lines) + "\n"
