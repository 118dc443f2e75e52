"""`fused-resnet layers`: every conv unit of a ResNet (conv -> BN [-> +
residual] [-> ReLU], the unit the fused paths run as one step) timed alone
at its shape in the network, per fused backend and mode, beside eager
PyTorch modules doing the same, with each layer's roofline; keyed by a
stable layer class, from which auto_choice.py derives the fastest backend
per class.

Layer class: "<mode>/<role>/<kh>x<kw>/s<stride>" (layer_class()), with
  mode  inference (BN folded, running statistics, no gradient) or train
        (batch statistics; forward + backward of the unit)
  role  stem        the network's first conv + BN + ReLU (7x7 in a ResNet)
        inner       a conv + BN + ReLU inside a residual block (a
                    bottleneck's conv1 and conv2, a basic block's conv1)
        last        a block's last conv + BN + residual add + ReLU
        downsample  a block's projection shortcut: conv + BN, no ReLU
e.g. "train/inner/3x3/s2": the strided 3x3 conv that opens a bottleneck
stage, in training. A class groups layers that take the same fused code
path (epilogue, kernel mode) at different channel counts and map sizes;
the fused modules can compute it for any of their units from the module
alone (the conv's kernel and stride, its place in the block) and the mode.

What a unit time leaves out: block-level fusions (the projection shortcut
as a second GEMM in inference, the BN prologue in training on triton) span
two units, so they show in the network figures of `fused-resnet bench`,
not here. Roofline columns count the convolution only (forward, plus the
data and weight gradients in training): the BN and elementwise passes are
traffic over that bound.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ... import dispatch
from . import environment
from .budget import DTYPES, Budget
from .timing import time_steps

# The layer classes are dispatch's (auto on CUDA reads them per class).
ROLES, MODES, layer_class = dispatch.ROLES, dispatch.MODES, dispatch.layer_class
EAGER = "eager"  # the baseline: torch modules (conv, BatchNorm2d, add, ReLU), same dtype and layout
CLASS_DEFINITION = ("<mode>/<role>/<kh>x<kw>/s<stride>; mode inference|train; role stem (first conv+BN+ReLU), "
                    "inner (conv+BN+ReLU inside a block), last (block's conv+BN+residual add+ReLU), "
                    "downsample (projection shortcut conv+BN)")


def parse_layer_class(key: str) -> dict:
    """layer_class()'s fields back: {"mode", "role", "kernel": (kh, kw), "stride": (sh, sw)}."""
    try:
        mode, role, kernel, stride = key.split("/")
        kh, kw = (int(v) for v in kernel.split("x"))
        s = stride[1:].split("x")
        sh, sw = int(s[0]), int(s[-1])
    except (ValueError, IndexError):
        raise ValueError(f"not a layer class: {key!r} (expected {CLASS_DEFINITION.split(';')[0]})") from None
    if mode not in MODES or role not in ROLES or not stride.startswith("s"):
        raise ValueError(f"not a layer class: {key!r} (expected {CLASS_DEFINITION.split(';')[0]})")
    return {"mode": mode, "role": role, "kernel": (kh, kw), "stride": (sh, sw)}


@dataclass
class Unit:
    """One conv unit of the network at batch size N (in_shape[0])."""

    name: str  # the conv's module name, e.g. layer2.0.conv2
    role: str
    in_channels: int
    out_channels: int
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    in_shape: tuple
    out_shape: tuple

    @property
    def relu(self) -> bool:
        return self.role != "downsample"

    @property
    def residual(self) -> bool:
        return self.role == "last"

    def signature(self) -> tuple:
        return (self.role, self.in_shape, self.out_shape, self.kernel, self.stride, self.padding, self.dilation,
                self.groups)

    def flops(self, mode: str) -> float:
        n, _, _, _ = self.in_shape
        _, cout, oh, ow = self.out_shape
        fwd = 2.0 * n * cout * oh * ow * (self.in_channels // self.groups) * self.kernel[0] * self.kernel[1]
        # Training adds the weight gradient, and the data gradient except at
        # the stem (the image needs none).
        return fwd * (1 + (2 if self.role != "stem" else 1)) if mode == "train" else fwd

    def min_bytes(self, mode: str, itemsize: int) -> float:
        x = _numel(self.in_shape)
        y = _numel(self.out_shape)
        w = self.out_channels * (self.in_channels // self.groups) * self.kernel[0] * self.kernel[1]
        fwd = x + w + y + (y if self.residual else 0)
        if mode == "train":  # dgrad: dy, w -> dx; wgrad: x, dy -> dw
            fwd += (y + w + x if self.role != "stem" else 0) + x + y + w
        return float(itemsize * fwd)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _role(name: str, model: nn.Module) -> str | None:
    parts = name.split(".")
    if name == "conv1":
        return "stem"
    if parts[-2:] == ["downsample", "0"]:
        return "downsample"
    if len(parts) == 3 and parts[0].startswith("layer") and parts[2].startswith("conv"):
        block = model.get_submodule(".".join(parts[:2]))
        last = "conv3" if hasattr(block, "conv3") else "conv2"
        return "last" if parts[2] == last else "inner"
    return None


def network_units(model_name: str, batch_size: int, image_size: int) -> list[Unit]:
    """Every conv unit of a torchvision ResNet, in forward order, with its
    shapes at this batch and image size (read off one batch-1 forward on
    the CPU)."""
    import torchvision

    model = getattr(torchvision.models, model_name)().eval()
    found: list[Unit] = []

    def hook(name):
        def fn(m: nn.Conv2d, inp, out):
            role = _role(name, model)
            if role is None:
                return
            found.append(Unit(name, role, m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride),
                              tuple(m.padding), tuple(m.dilation), m.groups,
                              (batch_size, *inp[0].shape[1:]), (batch_size, *out.shape[1:])))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in handles:
            h.remove()
    return found


def distinct_units(units: list[Unit]) -> list[tuple[Unit, list[str]]]:
    """Units of the same role and shapes once, with the names of all of them."""
    out: dict[tuple, tuple[Unit, list[str]]] = {}
    for u in units:
        out.setdefault(u.signature(), (u, []))[1].append(u.name)
    return list(out.values())


# ------------------------------------------------------------------ timing


def _modules(u: Unit, device, dtype, channels_last: bool, seed: int):
    torch.manual_seed(seed)
    conv = nn.Conv2d(u.in_channels, u.out_channels, u.kernel, u.stride, u.padding, u.dilation, u.groups, bias=False)
    bn = nn.BatchNorm2d(u.out_channels)
    with torch.no_grad():  # non-trivial BN state: a fold bug cannot hide behind weight 1, bias 0
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    mf = torch.channels_last if channels_last else torch.contiguous_format
    return conv.to(device=device, dtype=dtype, memory_format=mf), bn.to(device=device, dtype=dtype)


def _unit_step(u: Unit, mode: str, backend: str, device, dtype, channels_last: bool, seed: int = 0):
    """A callable running the unit once on `backend` (EAGER: torch modules)."""
    from ...nn.paths.units import unit

    conv, bn = _modules(u, device, dtype, channels_last, seed)
    mf = torch.channels_last if channels_last else torch.contiguous_format
    # Drawn on the device: at batch 256 a CPU draw of the largest input
    # takes longer than timing the layer.
    g = torch.Generator(device=device).manual_seed(seed + 1)

    def draw(shape):
        return torch.randn(shape, generator=g, device=device, dtype=dtype).contiguous(memory_format=mf)

    x = draw(u.in_shape)
    res = draw(u.out_shape) if u.residual else None

    def forward():
        if backend == EAGER:
            y = bn(conv(x))
            if res is not None:
                y = y + res
            return F.relu(y) if u.relu else y
        return unit(conv, bn, x, res, u.relu, backend)

    if mode == "inference":
        bn.eval()

        def step():
            with torch.no_grad():
                return forward()
        return step
    bn.train()
    x.requires_grad_(u.role != "stem")  # the image needs no gradient
    if res is not None:
        res.requires_grad_(True)
    dy = draw(u.out_shape)
    params = [conv.weight, bn.weight, bn.bias]
    leaves = params + [t for t in (x, res) if t is not None and t.requires_grad]

    def step():
        for t in leaves:
            t.grad = None
        forward().backward(dy)
    return step


def backend_status(backend: str, device) -> str | None:
    """Why `backend` cannot be timed on `device`, or None."""
    if backend == EAGER:
        return None
    av = dispatch.availability()
    if backend not in av:
        return f"unknown backend (expected {EAGER} or one of {', '.join(dispatch.BACKENDS)})"
    if not av[backend].available:
        return av[backend].reason
    if dispatch.resolve(backend, torch.device(device)) != backend:
        return f"does not run on {torch.device(device).type} tensors"
    return None


@dataclass
class LayersConfig:
    model: str
    batch_size: int
    image_size: int
    dtype: str  # key of budget.DTYPES
    device: str
    backends: tuple[str, ...]  # fused backends; EAGER is always timed first as the baseline
    modes: tuple[str, ...] = MODES
    steps: int = 10
    warmup: int = 3
    channels_last: bool = True
    # Seconds per (mode, backend) over all its layers: backend -> seconds, "*"
    # for the rest; a backend that runs out leaves its remaining layers
    # "over budget" and the next backend runs.
    budgets: dict[str, float] | None = None
    seed: int = 0

    def budget_for(self, backend: str) -> float | None:
        if not self.budgets:
            return None
        return self.budgets.get(backend, self.budgets.get("*"))


def _entry(u: Unit, names: list[str], mode: str, itemsize: int) -> dict:
    return {"mode": mode, "class": layer_class(mode, u.role, u.kernel, u.stride), "role": u.role, "name": names[0],
            "names": names, "count": len(names), "in_shape": list(u.in_shape), "out_shape": list(u.out_shape),
            "kernel": list(u.kernel), "stride": list(u.stride), "groups": u.groups, "flops": u.flops(mode),
            "min_bytes": u.min_bytes(mode, itemsize), "results": {}}


def _fill_roofline(entry: dict, peaks: dict) -> None:
    tc, tm = entry["flops"] / peaks["flops"], entry["min_bytes"] / peaks["bytes_per_s"]
    entry["bound_ms"] = max(tc, tm) * 1e3
    entry["limiter"] = "compute" if tc >= tm else "memory"
    for r in entry["results"].values():
        if r.get("ms"):
            s = r["ms"] / 1e3
            r["tflops"] = entry["flops"] / s / 1e12
            r["frac_peak_flops"] = entry["flops"] / s / peaks["flops"]
            r["frac_peak_bw"] = entry["min_bytes"] / s / peaks["bytes_per_s"]


def _totals(layers: list[dict]) -> dict:
    """Per mode and backend: the network's conv units summed (count x ms),
    and whether every layer has a figure."""
    out: dict = {}
    for e in layers:
        for b, r in e["results"].items():
            t = out.setdefault(e["mode"], {}).setdefault(b, {"ms": 0.0, "complete": True})
            if r.get("status") == "ok" and r.get("ms") is not None:
                t["ms"] += e["count"] * r["ms"]
            else:
                t["complete"] = False
    return out


def run_layers(cfg: LayersConfig, on_update=None, progress: bool = False, env: dict | None = None,
               peaks: dict | None = None) -> dict:
    """The per-layer record (module docstring); on_update(partial record)
    after each layer, so a caller can keep it on disk. env and peaks: the
    environment and device peaks when the caller has them already."""
    from .roofline import device_peaks

    device = torch.device(cfg.device)
    if cfg.dtype not in DTYPES:
        raise ValueError(f"layers: `dtype` must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    for mode in cfg.modes:
        if mode not in MODES:
            raise ValueError(f"layers: `modes` must be among {', '.join(MODES)}, got {mode!r}")
    dtype = DTYPES[cfg.dtype]
    env = env if env is not None else environment.describe(device)
    peaks_all = peaks if peaks is not None else device_peaks(device, dtype)
    use = peaks_all["spec"] or peaks_all["measured"]
    units = distinct_units(network_units(cfg.model, cfg.batch_size, cfg.image_size))
    backends = [EAGER] + [b for b in cfg.backends if b != EAGER]
    why_not = {b: backend_status(b, device) for b in backends}
    layers: list[dict] = []

    def record(complete: bool) -> dict:
        return {"schema": 1, "complete": complete, "class_definition": CLASS_DEFINITION,
                "config": {**asdict(cfg), "backends": list(cfg.backends), "modes": list(cfg.modes)},
                "environment": env, "peaks": peaks_all, "peaks_used": "spec" if peaks_all["spec"] else "measured",
                "layers": layers, "totals": _totals(layers)}

    for mode in cfg.modes:
        budgets = {b: Budget(cfg.budget_for(b)) for b in backends}
        for u, names in units:
            entry = _entry(u, names, mode, dtype.itemsize)
            layers.append(entry)
            for b in backends:
                entry["results"][b] = _time_one(u, mode, b, cfg, device, dtype, why_not[b], budgets[b], progress)
            _fill_roofline(entry, use)
            if on_update is not None:
                on_update(record(False))
    return record(True)


def merge_records(first: dict | None, second: dict) -> dict:
    """Two per-layer records of one configuration (e.g. one per mode, from
    two bench runs) as one: layers of both, totals over both, configs'
    modes and backends united."""
    if not first:
        return second
    merged = dict(second)
    layers = [e for e in first["layers"] if e["mode"] not in {x["mode"] for x in second["layers"]}]
    merged["layers"] = layers + second["layers"]
    merged["totals"] = _totals(merged["layers"])
    merged["complete"] = bool(first.get("complete")) and bool(second.get("complete"))
    cfg = dict(second["config"])
    for key in ("modes", "backends"):
        cfg[key] = list(dict.fromkeys(list(first["config"].get(key, [])) + list(cfg.get(key, []))))
    merged["config"] = cfg
    return merged


def _time_one(u: Unit, mode: str, backend: str, cfg: LayersConfig, device, dtype, why_not: str | None,
              budget: Budget, progress: bool) -> dict:
    if why_not is not None:
        return {"status": "unavailable", "reason": why_not}
    if budget.over():
        return {"status": "over budget",
                "reason": f"the {mode} budget of {budget.seconds:g} s for this backend was spent before this layer"}
    t0 = time.perf_counter()
    try:
        with budget.charge():
            step = _unit_step(u, mode, backend, device, dtype, cfg.channels_last, cfg.seed)
            first = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first = time.perf_counter() - first
            t = time_steps(step, device, steps=cfg.steps, warmup=max(cfg.warmup - 1, 0))
    except Exception as exc:  # noqa: BLE001 - one layer's failure must not hide the others
        if progress:
            import traceback

            traceback.print_exc()
        return {"status": "error", "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    finally:
        step = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"status": "ok", "ms": t.median_s * 1e3, "p90_ms": t.p90_ms, "first_call_s": first,
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------ report


def format_layers(rec: dict) -> str:
    """Per layer and mode: each backend's ms (x count), the fastest, the
    roofline bound; then the network's conv units summed per backend."""
    c = rec["config"]
    backends = [EAGER] + [b for b in c["backends"] if b != EAGER]
    lines = [f"Per-layer timings: {c['model']}, batch {c['batch_size']}, {c['image_size']}x{c['image_size']}, "
             f"{c['dtype']}, {'channels_last' if c['channels_last'] else 'contiguous'}, {c['device']}; median of "
             f"{c['steps']} steps; peaks used ({rec['peaks_used']}): "
             f"{(rec['peaks']['spec'] or rec['peaks']['measured'])['flops'] / 1e12:.1f} TFLOP/s, "
             f"{(rec['peaks']['spec'] or rec['peaks']['measured'])['bytes_per_s'] / 1e9:.0f} GB/s", ""]
    cols = ["class", "layer", "n", "in shape", "bound ms"] + [f"{b} ms" for b in backends] + ["fastest", "%peak"]
    rows = []
    for e in rec["layers"]:
        ok = {b: r["ms"] for b, r in e["results"].items() if r.get("status") == "ok" and b != EAGER}
        best = min(ok, key=ok.get) if ok else None
        cells = [e["class"], e["name"], str(e["count"]), "x".join(map(str, e["in_shape"])),
                 f"{e.get('bound_ms', 0):.3f}"]
        for b in backends:
            r = e["results"].get(b, {})
            cells.append(f"{r['ms']:.3f}" if r.get("status") == "ok" else {"over budget": "budget",
                         "unavailable": "n/a"}.get(r.get("status"), "ERR"))
        frac = e["results"][best].get("frac_peak_flops") if best else None
        cells += [best or "-", "-" if frac is None else f"{100 * frac:.0f}"]
        rows.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(cols)]
    fmt = lambda cells: "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines += [fmt(cols), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    lines.append("")
    for mode, per in rec["totals"].items():
        parts = [f"{b} {t['ms']:.2f} ms" + ("" if t["complete"] else " (incomplete)") for b, t in per.items()]
        lines.append(f"{mode}, conv units summed over the network: " + ", ".join(parts))
    errors = [(e["class"], e["name"], b, r["reason"]) for e in rec["layers"] for b, r in e["results"].items()
              if r.get("status") in ("error", "over budget")]
    lines += [f"{b} {name} [{cls}]: {why}" for cls, name, b, why in errors[:20]]
    if len(errors) > 20:
        lines.append(f"... and {len(errors) - 20} more")
    return "\n".join(lines)
