"""The bench result as a table (terminal / Markdown), JSON and a PNG chart."""

from __future__ import annotations

import json
import os

from ... import numerics


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _verdict(r: dict) -> str:
    if r["status"] == "unavailable":
        return "n/a"
    if r["status"] == "error":
        return "ERROR"
    ok = "ok" if r["numerics_ok"] else "FAILED"
    return f"{ok}, OVER BUDGET" if r["status"] == "over budget" else ok


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


COLUMNS = ("mode", "provider", "img/s", "vs eager", "vs amp", "vs compile", "p50 ms", "p90 ms", "steps",
           "peak MiB", "1st call s", "max err", "eager err", "verified")


def table_rows(result: dict) -> list[list[str]]:
    out = []
    for r in result["results"]:
        if r["status"] in ("unavailable", "error"):
            continue
        out.append([
            r["mode"], r["provider"], _f(r["images_per_s"], ".2f"), _ratio(r.get("ratio_to_eager")),
            _ratio(r.get("ratio_to_amp")), _ratio(r.get("ratio_to_compile")),
            _f(r["p50_ms"], ".1f"), _f(r["p90_ms"], ".1f"), str(len(r.get("times_ms") or [])),
            _f(r["peak_mem_mib"], ".0f"),
            _f(r["first_call_s"], ".1f"), _f(r["max_err"], ".2e"), _f(r["eager_err"], ".2e"), _verdict(r),
        ])
    return out


def _notes(result: dict) -> list[str]:
    notes, seen = [], set()
    c = result["config"]
    if "train" in c["modes"]:
        why = numerics.training_conditioning_note(c["batch_size"], c["image_size"])
        if why is not None:
            notes.append(f"train verification: {why}")
    for r in result["results"]:
        if r["status"] == "unavailable" and r["provider"] not in seen:
            seen.add(r["provider"])
            notes.append(f"{r['provider']}: not run ({r['reason']})")
        elif r["status"] == "error":
            notes.append(f"{r['provider']} [{r['mode']}]: ERROR {r['reason']}")
        elif r["status"] == "over budget":
            notes.append(f"{r['provider']} [{r['mode']}]: {r['reason']}")
        if r.get("fallbacks"):
            notes.append(f"{r['provider']} [{r['mode']}]: {len(r['fallbacks'])} layer graph(s) refused by cuDNN ran "
                         "as aten conv + our epilogue:")
            notes += [f"    {line.replace(chr(9), ': ', 1)}" for line in r["fallbacks"]]
    return notes


def _header(result: dict) -> str:
    c, e = result["config"], result["environment"]
    return (f"{c['model']}, batch {c['batch_size']}, {c['image_size']}x{c['image_size']}, {c['dtype']}, "
            f"{'channels_last' if c['channels_last'] else 'contiguous'} (eager row: contiguous) on "
            f"{e['device_name']} ({e['device']}, {e['cpu_threads']} CPU threads), torch {e['torch']}; "
            f"median of {c['steps']} steps after {c['warmup']} warm-up"
            + ("; providers timed in rounds (one step each per round)" if c.get("interleave", False)
               else "; providers timed one after another")
            + (f"; load average {e['load_average_1min']} at start on {e['cpu_count']} cores"
               if e.get("load_average_1min") is not None else ""))


def format_table(result: dict) -> str:
    rows = table_rows(result)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(COLUMNS)]
    line = lambda cells: "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    text = [_header(result), "", line(COLUMNS), line(["-" * w for w in widths])]
    text += [line(r) for r in rows]
    text.append("")
    text.append("1st call s: first step alone (compile / autotune / caches), excluded from img/s. "
                "peak MiB: " + result["memory_definition"] + ". max err: first step's logits vs the "
                "high-precision reference; eager err: the larger of eager's NCHW and channels_last errors; verified: "
                "within the numerics criterion (fused_resnet.numerics).")
    text += _notes(result)
    return "\n".join(text)


def format_markdown(result: dict) -> str:
    rows = table_rows(result)
    md = [_header(result), "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += [""] + [f"- {n}" for n in _notes(result)]
    return "\n".join(md)


def write_json(result: dict, path: str) -> None:
    """Written to a temporary file and renamed into place: a reader (or a
    process killed mid-write) never leaves half a file."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def write_plot(result: dict, path: str) -> str | None:
    """A bar chart of images/s per provider and mode. Returns None on success,
    else why no chart was written (matplotlib is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    rows = [r for r in result["results"] if r["images_per_s"]]
    modes = [m for m in ("inference", "train") if any(r["mode"] == m for r in rows)]
    if not modes:
        return "no provider produced a timing"
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        mr = [r for r in rows if r["mode"] == mode]
        colors = ["tab:red" if not r["numerics_ok"] else ("tab:blue" if r["kind"] == "fused" else "tab:gray")
                  for r in mr]
        ax.bar([r["provider"] for r in mr], [r["images_per_s"] for r in mr], color=colors)
        ax.set_title(mode)
        ax.set_ylabel("images/s")
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(_header(result)[:140], fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
