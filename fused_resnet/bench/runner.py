"""`fused-resnet bench`: every provider, side by side in one process, on the
same weights and input; verification before timing; one row per provider
and mode."""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

from .. import numerics
from . import environment, providers as prov
from .timing import Timing, peak_memory_bytes, synchronize, timed_call

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("inference", "train")


@dataclass
class BenchConfig:
    model: str
    batch_size: int
    image_size: int
    dtype: str  # key of DTYPES
    device: str
    modes: tuple[str, ...]
    steps: int
    warmup: int
    channels_last: bool = True
    providers: list[str] | None = None  # None: all
    num_classes: int = 1000
    seed: int = 0
    measure_memory: bool = True
    compile_mode: str = "auto"  # torch.compile mode for inference; auto = max-autotune on GPU
    relu_saves: str | None = None  # fused training's ReLU backward state (None: the current setting)
    # Timed steps in rounds, one step of every provider per round, so that a
    # machine whose speed drifts (a shared VM, a GPU's clocks) shifts every
    # provider alike; False: each provider's steps back to back.
    interleave: bool = True

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def defaults_for(device: str) -> dict:
    """The embedded defaults (issue 9): a GPU run at training scale, a CPU run
    that finishes in minutes on two cores."""
    if torch.device(device).type == "cuda":
        return dict(model="resnet50", batch_size=256, image_size=224, dtype="bf16", steps=20, warmup=5)
    return dict(model="resnet50", batch_size=8, image_size=224, dtype="fp32", steps=5, warmup=2)


@dataclass
class Row:
    mode: str
    provider: str
    kind: str
    backend: str | None
    status: str  # ok | FAILED (numerics) | unavailable | error
    reason: str = ""
    images_per_s: float | None = None
    ratio_to_eager: float | None = None
    ratio_to_compile: float | None = None
    median_ms: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    peak_mem_mib: float | None = None
    first_call_s: float | None = None
    max_err: float | None = None
    mean_err: float | None = None
    eager_err: float | None = None
    err_bound: float | None = None
    numerics_ok: bool | None = None
    # cudnn backend: "graph key<TAB>cuDNN's reason" for every layer graph
    # cuDNN refused during this row (those layers ran as aten conv + our
    # epilogue).
    fallbacks: list[str] = field(default_factory=list)


def _cudnn_refusals() -> set[tuple[str, str]]:
    from ..ops import cudnn_conv

    try:
        return set(cudnn_conv.fallbacks())
    except Exception:  # noqa: BLE001 - the list is informative; never fail a row for it
        return set()


class _Progress:
    """tqdm when installed, else one plain line per task on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True)
            except ImportError:
                pass
        self.total, self.done = total, 0

    def start(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_description(what)
        elif self.enabled:
            print(f"[{self.done + 1}/{self.total}] {what} ...", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _worst(outs: list[torch.Tensor], ref: torch.Tensor) -> torch.Tensor:
    return max(outs, key=lambda o: numerics.max_abs_err(o.float(), ref))


def _prepare_provider(p: prov.Provider, mode: str, cfg: BenchConfig, sd, x, y, ref, eager_out,
                      own: bool = False) -> tuple[Row, torch.Tensor, object, set]:
    """Build the provider's step, run its first call (timed alone, its output
    verified) and its warm-up steps: (row, output, step, cuDNN refusals
    before)."""
    row = Row(mode=mode, provider=p.name, kind=p.kind, backend=p.backend, status="ok", reason=p.reason)
    refused_before = _cudnn_refusals() if p.backend == "cudnn" else set()
    step = prov.make_step(p, mode, cfg.model, sd, x, y, cfg.torch_dtype, cfg.channels_last, cfg.num_classes,
                          compile_mode=cfg.compile_mode)
    # The first call compiles / autotunes / warms caches; it is timed on its
    # own, and its output (from the initial weights) is the one verified.
    t0 = time.perf_counter()
    out = step.call()
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    row.first_call_s = time.perf_counter() - t0
    if eager_out is None:  # this is the eager row itself
        eager_out = out
    elif own:  # an eager layout: part of the baseline it is judged by
        eager_out = _worst([eager_out, out], ref)
    v = numerics.compare(out.float(), eager_out.float(), ref, dtype=cfg.torch_dtype, kind="output")
    row.max_err, row.mean_err, row.eager_err, row.err_bound, row.numerics_ok = (
        v.fused_err, v.mean_err, v.eager_err, v.bound, v.ok)
    if not v.ok:
        row.status = "FAILED"
    for _ in range(max(cfg.warmup - 1, 0)):
        step.call()
        synchronize(x.device)
    return row, out, step, refused_before


def _finish_provider(row: Row, step, refused_before: set, cfg: BenchConfig, x) -> None:
    """Statistics of the timed steps, the (untimed) peak-memory step and the
    cuDNN refusals of this row."""
    t = Timing(times_s=[ms / 1e3 for ms in row.times_ms])
    row.median_ms = t.median_s * 1e3
    row.p50_ms, row.p90_ms = t.p50_ms, t.p90_ms
    row.images_per_s = cfg.batch_size / t.median_s
    if cfg.measure_memory:
        peak = peak_memory_bytes(step.call, x.device)
        row.peak_mem_mib = None if peak is None else peak / 2**20
    if row.backend == "cudnn":
        row.fallbacks = sorted(f"{k}\t{why}" for k, why in _cudnn_refusals() - refused_before)


def _time_rounds(prepared: list[tuple[Row, object]], cfg: BenchConfig, x, progress: bool) -> None:
    """cfg.steps timed steps per provider, in rounds (cfg.interleave) or
    back to back; each provider's times go to its row. A provider whose step
    raises is marked as an error and leaves the rounds."""
    active = list(prepared)

    def run(entry, steps: int) -> None:
        row, step = entry
        try:
            for _ in range(steps):
                dt, _ = timed_call(step.call, x.device)
                row.times_ms.append(dt * 1e3)
        except Exception as exc:  # noqa: BLE001 - one broken provider must not hide the others
            _mark_error(row, exc, progress)
            row.times_ms = []
            active.remove(entry)

    if cfg.interleave:
        for _ in range(cfg.steps):
            for entry in list(active):
                run(entry, 1)
    else:
        for entry in list(active):
            run(entry, cfg.steps)


def run_bench(cfg: BenchConfig, progress: bool = True) -> dict:
    from .. import relu_saves, set_relu_saves

    before = relu_saves()
    if cfg.relu_saves is not None:
        set_relu_saves(cfg.relu_saves)
    cfg.relu_saves = relu_saves()
    try:
        return _run_bench(cfg, progress)
    finally:
        set_relu_saves(before)


def _run_bench(cfg: BenchConfig, progress: bool) -> dict:
    device = torch.device(cfg.device)
    dtype = cfg.torch_dtype
    env = environment.describe(device)  # before the run: the load average then is the one that matters
    plist = prov.select_providers(device, dtype, cfg.providers)
    runnable = [p for p in plist if p.available]
    sd = prov.reference_state_dict(cfg.model, cfg.seed, cfg.num_classes)
    x, y = prov.make_input(cfg.batch_size, cfg.image_size, device, dtype, seed=cfg.seed + 1,
                           num_classes=cfg.num_classes)
    eager_p = prov.make_provider("eager", device, dtype)
    bar = _Progress(total=len(cfg.modes) * (1 + len(runnable)), enabled=progress)
    rows: list[Row] = []
    try:
        for mode in cfg.modes:
            bar.start(f"{mode}: reference")
            ref = prov.reference_logits(cfg.model, sd, x, mode, cfg.num_classes)

            def eager_logits():
                return prov.make_step(eager_p, mode, cfg.model, sd, x, y, dtype, False, cfg.num_classes).call()

            # PyTorch's own outputs (NCHW, and channels_last when that row runs):
            # each row is judged against the larger of their errors.
            eager_outs: list[torch.Tensor] = [] if "eager" in [p.name for p in runnable] else [eager_logits()]
            bar.advance()
            order = {"eager": 0, "channels_last": 1}
            # Every provider is built, verified and warmed first; then all
            # are timed together (see BenchConfig.interleave).
            mode_rows: list[Row] = []
            prepared: list[tuple[Row, object, set]] = []
            for p in sorted(runnable, key=lambda p: order.get(p.name, 2)):
                bar.start(f"{mode}: {p.name}")
                if p.name != "eager" and not eager_outs:  # the eager row failed: judge by a plain eager step
                    eager_outs.append(eager_logits())
                try:
                    if p.name == "eager":
                        row, out, step, refused = _prepare_provider(p, mode, cfg, sd, x, y, ref, None)
                        eager_outs.append(out)
                    elif p.name == "channels_last":
                        row, out, step, refused = _prepare_provider(p, mode, cfg, sd, x, y, ref,
                                                                    _worst(eager_outs, ref), own=True)
                        eager_outs.append(out)
                    else:
                        row, out, step, refused = _prepare_provider(p, mode, cfg, sd, x, y, ref,
                                                                    _worst(eager_outs, ref))
                    prepared.append((row, step, refused))
                except Exception as exc:  # noqa: BLE001 - one broken provider must not hide the others
                    row = Row(mode=mode, provider=p.name, kind=p.kind, backend=p.backend, status="ok")
                    _mark_error(row, exc, progress)
                mode_rows.append(row)
                bar.advance()
            bar.start(f"{mode}: timing {len(prepared)} providers" + (" in rounds" if cfg.interleave else ""))
            _time_rounds([(row, step) for row, step, _ in prepared], cfg, x, progress)
            for row, step, refused in prepared:
                if row.status == "error":
                    continue
                try:
                    _finish_provider(row, step, refused, cfg, x)
                except Exception as exc:  # noqa: BLE001 - one broken provider must not hide the others
                    _mark_error(row, exc, progress)
            prepared.clear()
            rows.extend(mode_rows)
            for p in plist:
                if not p.available:
                    rows.append(Row(mode=mode, provider=p.name, kind=p.kind, backend=p.backend,
                                    status="unavailable", reason=p.reason))
    finally:
        bar.close()
    _fill_ratios(rows)
    return {
        "schema": 1,
        "config": {**asdict(cfg), "modes": list(cfg.modes)},
        "environment": env,
        "memory_definition": "peak tensor memory allocated during one step above what was allocated before it "
                             "(GPU: torch.cuda.max_memory_allocated; CPU: allocator events via torch.profiler)",
        "providers": [p.to_dict() for p in plist],
        "results": [asdict(r) for r in rows],
    }


def _mark_error(row: Row, exc: Exception, progress: bool) -> None:
    """The row's provider raised: status "error", the exception's first line
    as the reason (the traceback on stderr with progress on)."""
    row.status, row.reason = "error", f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    if progress:
        traceback.print_exc(file=sys.stderr)


def _fill_ratios(rows: list[Row]) -> None:
    for mode in MODES:
        base = {r.provider: r.images_per_s for r in rows if r.mode == mode and r.images_per_s}
        for r in rows:
            if r.mode != mode or not r.images_per_s:
                continue
            if "eager" in base:
                r.ratio_to_eager = r.images_per_s / base["eager"]
            if "compile" in base:
                r.ratio_to_compile = r.images_per_s / base["compile"]


def failed(result: dict) -> bool:
    """True if any row that ran failed its numerics check or raised."""
    return any(r["status"] in ("FAILED", "error") for r in result["results"])
