"""`fused-resnet bench`: every provider, side by side in one process, on the
same weights and input; verification before timing; one row per provider
and mode."""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

from ... import numerics
from ...config import get_fusions
from . import environment, providers as prov
from .budget import DTYPES, Budget
from .timing import Timing, peak_memory_bytes, synchronize, timed_call

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
    # Seconds each provider may spend per mode (see Budget): provider name ->
    # seconds, "*" for the others; None or a missing entry: no limit.
    budgets: dict[str, float] | None = None
    # After each mode's rows, time every conv unit alone for each fused
    # backend that ran (bench/layers.py), in this process, whose caches the
    # network run has filled; layer_budgets: seconds per backend and mode
    # for that (backend name or "*" -> seconds).
    layers: bool = False
    layer_budgets: dict[str, float] | None = None

    def budget_for(self, provider: str) -> float | None:
        if not self.budgets:
            return None
        return self.budgets.get(provider, self.budgets.get("*"))

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
    status: str  # ok | FAILED (numerics) | unavailable | error | over budget
    reason: str = ""
    images_per_s: float | None = None
    ratio_to_eager: float | None = None
    ratio_to_amp: float | None = None  # GPU runs: eager AMP, channels_last (the GPU baseline)
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
    # The provider's budget in seconds (None: none), and the fusion switches
    # in effect while it ran (fused_resnet.get_fusions()).
    budget_s: float | None = None
    fusions: dict = field(default_factory=dict)


def _cudnn_refusals() -> set[tuple[str, str]]:
    from ...backends.cudnn import graphs as cudnn_graphs

    try:
        return set(cudnn_graphs.fallbacks())
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


def _mark_over_budget(row: Row, budget: Budget, where: str) -> None:
    """The row ran out of its budget: status "over budget" (a FAILED or error
    row keeps its status: the numerics matter more), with where it stopped."""
    note = f"over its budget of {budget.seconds:g} s ({budget.spent:.1f} s spent) {where}"
    if row.status == "ok":
        row.status, row.reason = "over budget", note
    else:
        row.reason = f"{row.reason}; {note}" if row.reason else note


def _prepare_provider(p: prov.Provider, mode: str, cfg: BenchConfig, sd, x, y, ref, eager_out,
                      own: bool = False, budget: Budget | None = None) -> tuple[Row, torch.Tensor, object, set]:
    """Build the provider's step, run its first call (timed alone, its output
    verified) and its warm-up steps: (row, output, step, cuDNN refusals
    before). Warm-up stops when the budget is spent (the row says so)."""
    budget = budget or Budget(None)
    row = Row(mode=mode, provider=p.name, kind=p.kind, backend=p.backend, status="ok", reason=p.reason,
              budget_s=budget.seconds)
    with prov.fusions_of(p):
        row.fusions = get_fusions()
    refused_before = _cudnn_refusals() if p.backend == "cudnn" else set()
    with budget.charge():
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
    warm = max(cfg.warmup - 1, 0)
    done = 0
    while done < warm and not budget.over():
        with budget.charge():
            step.call()
            synchronize(x.device)
        done += 1
    if budget.over():
        _mark_over_budget(row, budget, f"after its first call and {done} of {warm} warm-up steps")
    return row, out, step, refused_before


def _finish_provider(row: Row, step, refused_before: set, cfg: BenchConfig, x, over_budget: bool = False) -> None:
    """Statistics of the timed steps, the (untimed) peak-memory step and the
    cuDNN refusals of this row. A row over its budget keeps the statistics of
    the steps it timed and skips the memory step."""
    if row.times_ms:
        t = Timing(times_s=[ms / 1e3 for ms in row.times_ms])
        row.median_ms = t.median_s * 1e3
        row.p50_ms, row.p90_ms = t.p50_ms, t.p90_ms
        row.images_per_s = cfg.batch_size / t.median_s
    if cfg.measure_memory and not over_budget:
        peak = peak_memory_bytes(step.call, x.device)
        row.peak_mem_mib = None if peak is None else peak / 2**20
    if row.backend == "cudnn":
        row.fallbacks = sorted(f"{k}\t{why}" for k, why in _cudnn_refusals() - refused_before)


def _time_rounds(prepared: list[tuple[Row, object]], cfg: BenchConfig, x, progress: bool,
                 budgets: list[Budget] | None = None) -> None:
    """cfg.steps timed steps per provider, in rounds (cfg.interleave) or
    back to back; each provider's times go to its row. A provider whose step
    raises is marked as an error and leaves the rounds; one whose budget is
    spent is marked "over budget" and leaves them with the steps it timed."""
    budgets = budgets or [Budget(None) for _ in prepared]
    active = [(row, step, budget) for (row, step), budget in zip(prepared, budgets)]

    def run(entry, steps: int) -> None:
        row, step, budget = entry
        try:
            for _ in range(steps):
                if budget.over():
                    _mark_over_budget(row, budget, f"after {len(row.times_ms)} of {cfg.steps} timed steps")
                    active.remove(entry)
                    return
                with budget.charge():
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


def run_bench(cfg: BenchConfig, progress: bool = True, on_update=None) -> dict:
    """The bench result (see _result). on_update(result), if given, receives
    the result so far ("complete": false) each time a row is final, so a
    caller can keep it on disk while later providers run."""
    from ... import relu_saves, set_relu_saves

    before = relu_saves()
    if cfg.relu_saves is not None:
        set_relu_saves(cfg.relu_saves)
    cfg.relu_saves = relu_saves()
    try:
        return _run_bench(cfg, progress, on_update)
    finally:
        set_relu_saves(before)


def _result(cfg: BenchConfig, env: dict, plist: list, rows: list[Row], complete: bool,
            layers: dict | None = None) -> dict:
    _fill_ratios(rows)
    out = {
        "schema": 2,
        "complete": complete,
        "config": {**asdict(cfg), "modes": list(cfg.modes)},
        "environment": env,
        "memory_definition": "peak tensor memory allocated during one step above what was allocated before it "
                             "(GPU: torch.cuda.max_memory_allocated; CPU: allocator events via torch.profiler)",
        "providers": [p.to_dict() for p in plist],
        "results": [asdict(r) for r in rows],
    }
    if cfg.layers:
        out["layers"] = layers
    return out


def _layers_for_mode(cfg: BenchConfig, mode: str, mode_rows: list[Row], env: dict, peaks: dict, progress: bool,
                     on_layers) -> dict | None:
    """bench/layers.py's per-layer record of `mode` for the fused backends
    whose network row ran (a backend that raised is left out)."""
    from .layers import LayersConfig, run_layers

    backends = list(dict.fromkeys(r.backend for r in mode_rows
                                  if r.kind == "fused" and r.backend and r.status in ("ok", "FAILED", "over budget")))
    lcfg = LayersConfig(model=cfg.model, batch_size=cfg.batch_size, image_size=cfg.image_size, dtype=cfg.dtype,
                        device=cfg.device, backends=tuple(backends), modes=(mode,), steps=cfg.steps,
                        warmup=cfg.warmup, channels_last=cfg.channels_last, budgets=cfg.layer_budgets,
                        seed=cfg.seed)
    return run_layers(lcfg, on_update=on_layers, progress=progress, env=env, peaks=peaks)


def _run_bench(cfg: BenchConfig, progress: bool, on_update) -> dict:
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
    layers: dict | None = None
    peaks: dict | None = None

    def update(pending: list[Row], layers_now: dict | None = None) -> None:
        if on_update is not None:
            on_update(_result(cfg, env, plist, rows + pending, complete=False, layers=layers_now or layers))

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
            # In rounds (cfg.interleave) every provider is built, verified and
            # warmed first, then all are timed together; back to back, each
            # provider is built, timed and finished (its row final, on_update
            # told) before the next one is built.
            mode_rows: list[Row] = []
            prepared: list[tuple[Row, object, set, Budget]] = []
            for p in sorted(runnable, key=lambda p: order.get(p.name, 2)):
                bar.start(f"{mode}: {p.name}")
                if mode not in p.modes:
                    mode_rows.append(Row(mode=mode, provider=p.name, kind=p.kind, backend=p.backend,
                                         status="unavailable", reason=f"{mode} is not among its modes "
                                         f"({', '.join(p.modes)}): its fusions apply there only"))
                    bar.advance()
                    continue
                if p.name != "eager" and not eager_outs:  # the eager row failed: judge by a plain eager step
                    eager_outs.append(eager_logits())
                budget = Budget(cfg.budget_for(p.name))
                try:
                    if p.name == "eager":
                        row, out, step, refused = _prepare_provider(p, mode, cfg, sd, x, y, ref, None,
                                                                    budget=budget)
                        eager_outs.append(out)
                    elif p.name == "channels_last":
                        row, out, step, refused = _prepare_provider(p, mode, cfg, sd, x, y, ref,
                                                                    _worst(eager_outs, ref), own=True,
                                                                    budget=budget)
                        eager_outs.append(out)
                    else:
                        row, out, step, refused = _prepare_provider(p, mode, cfg, sd, x, y, ref,
                                                                    _worst(eager_outs, ref), budget=budget)
                    del out
                    prepared.append((row, step, refused, budget))
                except Exception as exc:  # noqa: BLE001 - one broken provider must not hide the others
                    row = Row(mode=mode, provider=p.name, kind=p.kind, backend=p.backend, status="ok",
                              budget_s=budget.seconds)
                    _mark_error(row, exc, progress)
                mode_rows.append(row)
                bar.advance()
                if not cfg.interleave:
                    _time_and_finish(prepared, cfg, x, progress)
                    prepared.clear()  # frees this provider's model before the next is built
                    update(mode_rows)
            if prepared:
                bar.start(f"{mode}: timing {len(prepared)} providers in rounds")
                _time_and_finish(prepared, cfg, x, progress)
                prepared.clear()
            for p in plist:
                if not p.available:
                    mode_rows.append(Row(mode=mode, provider=p.name, kind=p.kind, backend=p.backend,
                                         status="unavailable", reason=p.reason))
            rows.extend(mode_rows)
            update([])
            if cfg.layers:
                from .layers import merge_records
                from .roofline import device_peaks

                bar.start(f"{mode}: per-layer timings")
                if peaks is None:
                    peaks = device_peaks(device, dtype)
                earlier = layers
                rec = _layers_for_mode(cfg, mode, mode_rows, env, peaks, progress,
                                       lambda partial: update([], merge_records(earlier, partial)))
                layers = merge_records(earlier, rec)
                update([])
    finally:
        bar.close()
    return _result(cfg, env, plist, rows, complete=True, layers=layers)


def _time_and_finish(prepared: list[tuple[Row, object, set, Budget]], cfg: BenchConfig, x, progress: bool) -> None:
    """Time the prepared providers that are still within budget and not
    broken, then finish every row that has a step."""
    timed = [(row, step, budget) for row, step, _, budget in prepared
             if row.status in ("ok", "FAILED") and not budget.over()]
    _time_rounds([(row, step) for row, step, _ in timed], cfg, x, progress, [b for _, _, b in timed])
    for row, step, refused, budget in prepared:
        if row.status == "error":
            continue
        try:
            _finish_provider(row, step, refused, cfg, x, over_budget=budget.over())
        except Exception as exc:  # noqa: BLE001 - one broken provider must not hide the others
            _mark_error(row, exc, progress)


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
            if "amp" in base:
                r.ratio_to_amp = r.images_per_s / base["amp"]
            if "compile" in base:
                r.ratio_to_compile = r.images_per_s / base["compile"]


def failed(result: dict) -> bool:
    """True if any row that ran failed its numerics check or raised."""
    return any(r["status"] in ("FAILED", "error") for r in result["results"])
