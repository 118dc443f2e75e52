"""The Triton conv's tuned configs, carried from one lease to the next.

export() writes autotune.json beside the record: every autotune cache entry
the check's processes wrote (key -> config name), with the tuning log
(triton/autotune_budget.py: what each key cost, which cap cut it short).
seed() starts a check's autotune cache from the newest earlier record of the
same GPU, so a later lease spends its minutes measuring rather than tuning.
Keys name the architecture, dtype, shape bucket and kernel version, so an
entry of an older kernel is simply never looked up.
"""

from __future__ import annotations

import json
import os

FILE = "autotune.json"


def _kernel_version() -> str | None:
    try:
        from ...backends.triton.conv2d_fwd import KERNEL_VERSION
    except Exception:  # noqa: BLE001 - no triton here: nothing to seed or export
        return None
    return KERNEL_VERSION


def _cache(cache_dir: str):
    from ...backends.triton import autotune_cache

    version = _kernel_version()
    if version is None:
        return None
    return autotune_cache.AutotuneCache(os.path.join(cache_dir, f"autotune-{version}.json"))


def previous(results_dir: str, device_name: str, exclude: str | None = None) -> str | None:
    """The newest autotune.json under results_dir/<date>-<gpu>/ recorded on a
    GPU of this name (the directory names start with the date, so the
    largest name is the newest), other than `exclude`."""
    found = []
    try:
        names = sorted(os.listdir(results_dir))
    except OSError:
        return None
    for name in names:
        path = os.path.join(results_dir, name, FILE)
        if exclude and os.path.abspath(os.path.join(results_dir, name)) == os.path.abspath(exclude):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("device_name") == device_name and isinstance(data.get("entries"), dict):
            found.append(path)
    return found[-1] if found else None


def seed(cache_dir: str, results_dir: str, device_name: str, exclude: str | None = None) -> dict | None:
    """Copy the entries of the newest earlier record of this GPU into the
    autotune cache under cache_dir; what was seeded, or None."""
    src = previous(results_dir, device_name, exclude)
    cache = _cache(cache_dir)
    if src is None or cache is None:
        return None
    with open(src, encoding="utf-8") as f:
        entries = {str(k): v for k, v in json.load(f)["entries"].items() if isinstance(v, str)}
    version = _kernel_version()
    current = {k: v for k, v in entries.items() if k.endswith(f"|{version}")}
    if current:
        cache.put_many(current)
    return {"from": os.path.relpath(src, os.path.dirname(os.path.abspath(results_dir))), "entries": len(current),
            "other_kernel_versions": len(entries) - len(current)}


def export(cache_dir: str, log_path: str, out_path: str, device_name: str, capability: str | None,
           seeded: dict | None = None) -> dict:
    """Write autotune.json (module docstring); returns its summary."""
    from ...backends.triton import autotune_budget

    cache = _cache(cache_dir)
    entries = cache.entries() if cache is not None else {}
    log = autotune_budget.read_log(log_path)
    summary = {
        "entries": len(entries),
        "tuned_keys": sum(1 for e in log if e.get("timed")),
        "capped_keys": sum(1 for e in log if e.get("capped") and e.get("timed")),
        "untuned_keys": sum(1 for e in log if not e.get("timed")),
        "tuning_seconds": round(sum(float(e.get("seconds") or 0) for e in log), 1),
        "seeded": seeded,
    }
    data = {"schema": 1, "kernel_version": _kernel_version(), "device_name": device_name,
            "compute_capability": capability, "summary": summary, "entries": entries, "tuning": log}
    tmp = f"{out_path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, out_path)
    return summary
