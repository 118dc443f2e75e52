"""Which backend a recorded per-layer run (bench/layers.py) shows fastest for
each layer class: the table `auto` on CUDA is to follow once figures exist.

derive() is a pure function of the record: for each layer class, every
candidate backend's time summed over the class's layers (count x median
ms), and the fastest; a backend that lacks a figure (error, over budget,
unavailable) for any layer of the class cannot win it, and a class that no
candidate covers gets backend None. The file `make gpu-check` writes
(auto_choice.json beside the record) is derive()'s result:

  {"schema": 1,
   "source": {"model", "batch_size", "image_size", "dtype", "channels_last",
              "device_name", "compute_capability", "git_commit", "date"},
   "default": "cuda",                 # what auto picks for a class not listed
   "candidates": ["cuda", "cudnn", "triton"],
   "classes": {"train/inner/3x3/s1": {
       "backend": "triton",           # the fastest, or null
       "ms": {"cuda": 41.2, "cudnn": 44.0, "triton": 35.9},   # summed over the class
       "eager_ms": 52.3,              # the eager modules, for scale (null if missing)
       "speedup_vs_next": 1.148,      # second fastest / fastest (null with one candidate)
       "layers": 12,                  # units of the network in the class (with repeats)
       "names": ["layer1.0.conv2", ...],
       "incomplete": {"cudnn": "error: ..."}}}}   # candidates that could not win, and why
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ... import dispatch
from .layers import EAGER, parse_layer_class

DEFAULT_BACKEND = "cuda"  # auto on CUDA until a record exists (fused_resnet/dispatch.py)


def derive(record: dict, candidates: list[str] | None = None, default: str = DEFAULT_BACKEND) -> dict:
    """{layer class: fastest backend, with the figures behind it} from a
    per-layer record (the dict bench/layers.run_layers returns, or its
    JSON). candidates: the backends that may win (default: every backend
    in the record except the eager baseline)."""
    layers = record.get("layers")
    if not isinstance(layers, list):
        raise ValueError("auto_choice.derive: `record` has no 'layers' list (not a per-layer record)")
    if candidates is None:
        seen: list[str] = []
        for e in layers:
            seen += [b for b in e.get("results", {}) if b != EAGER and b not in seen]
        candidates = seen
    by_class: dict[str, list[dict]] = {}
    for e in layers:
        parse_layer_class(e["class"])  # a malformed key is an error, not a silent class of its own
        by_class.setdefault(e["class"], []).append(e)
    classes = {}
    for key in sorted(by_class):
        entries = by_class[key]
        totals: dict[str, float] = {}
        incomplete: dict[str, str] = {}
        for b in candidates + [EAGER]:
            total = 0.0
            for e in entries:
                r = e.get("results", {}).get(b)
                if not r or r.get("status") != "ok" or r.get("ms") is None:
                    why = "no figure" if not r else f"{r.get('status')}: {r.get('reason', '')}".rstrip(": ")
                    incomplete[b] = f"{e['name']}: {why}"
                    break
                total += e.get("count", 1) * float(r["ms"])
            else:
                totals[b] = total
        eager_ms = totals.pop(EAGER, None)
        incomplete.pop(EAGER, None)
        ranked = sorted(totals, key=totals.get)
        best = ranked[0] if ranked else None
        classes[key] = {
            "backend": best,
            "ms": {b: round(totals[b], 6) for b in ranked},
            "eager_ms": None if eager_ms is None else round(eager_ms, 6),
            "speedup_vs_next": round(totals[ranked[1]] / totals[best], 4) if len(ranked) > 1 and totals[best] > 0
            else None,
            "layers": sum(e.get("count", 1) for e in entries),
            "names": [n for e in entries for n in e.get("names", [e["name"]])],
            "incomplete": {b: why for b, why in incomplete.items() if b in candidates},
        }
    cfg, env = record.get("config", {}), record.get("environment", {})
    return {
        "schema": 1,
        "source": {"model": cfg.get("model"), "batch_size": cfg.get("batch_size"),
                   "image_size": cfg.get("image_size"), "dtype": cfg.get("dtype"),
                   "channels_last": cfg.get("channels_last"), "device_name": env.get("device_name"),
                   "compute_capability": env.get("compute_capability"), "git_commit": env.get("git_commit"),
                   "date": record.get("date")},
        "default": default,
        "candidates": list(candidates),
        "classes": classes,
    }


def format_choice(choice: dict) -> str:
    """One line per class: the winner, its summed ms and the others'."""
    lines = [f"auto choice (default {choice['default']}; candidates {', '.join(choice['candidates']) or 'none'}):"]
    for key, c in choice["classes"].items():
        others = ", ".join(f"{b} {ms:.3f}" for b, ms in c["ms"].items())
        eager = "" if c["eager_ms"] is None else f"; eager {c['eager_ms']:.3f}"
        lines.append(f"  {key:<28} {str(c['backend']):<8} ms: {others or '-'}{eager}")
    return "\n".join(lines)


def install(path: str | os.PathLike) -> Path:
    """Adopt a recorded auto_choice.json (benchmarks/results/<run>/): copy it
    to fused_resnet/auto_choices/<gpu>.json, which `auto` on CUDA reads for
    that GPU (dispatch.recorded_auto_choice). Returns the file written."""
    choice = json.loads(Path(path).read_text())
    device = (choice.get("source") or {}).get("device_name")
    if choice.get("schema") != 1 or not device or not isinstance(choice.get("classes"), dict):
        raise ValueError(f"{path}: not an auto_choice.json (schema 1 with source.device_name and classes)")
    target = dispatch.auto_choice_path(device)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(choice, indent=1, sort_keys=True) + "\n")
    dispatch.recorded_auto_choice.cache_clear()
    return target


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "install":
        raise SystemExit("usage: python -m fused_resnet.tools.bench.auto_choice install RECORD/auto_choice.json")
    print(f"wrote {install(sys.argv[2])}")
