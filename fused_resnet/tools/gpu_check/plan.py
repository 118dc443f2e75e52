"""The steps of `make gpu-check`, per profile, in the order they run: each
with its command, its estimated seconds and the basis of that estimate, and
its cap (the step's own time limit).

Profiles:
  lease      (default) one device command of at most 10 minutes, from a
             lease of 15: the figures first (build, then resnet50 bf16
             channels_last batch 256 inference, training, torch.compile),
             within 8 minutes by estimate; then tests with the time left;
             then compute-sanitizer. Every step and provider has a cap.
  full       the same steps with 20 timed steps per provider, no tuning caps
             and no overall deadline, and every CUDA test: for a session with
             time to spare (spread it over commands with --only).
  rehearsal  the same code path on the CPU at tiny sizes with the CPU
             providers, writing the same record files: what `make test`
             runs (tests/tools/test_gpu_check.py), so the check cannot break
             unseen between leases.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from . import costs, selection
from .costs import Figure

PRE_TEST_LIMIT_S = 480  # the issue: the figures within the lease's first 8 minutes


@dataclass
class Step:
    name: str
    what: str
    argv: list[str]
    estimate: Figure
    cap_s: float
    env: dict[str, str] = field(default_factory=dict)
    result: str | None = None  # the record's key for the JSON the step writes
    output: str | None = None  # where the step writes that JSON
    tests: bool = False  # a test step: runs after the figures, with the time left
    fill: bool = False  # takes the time left, less what the later steps reserve
    min_s: float = 0.0  # not started with less time left than this


@dataclass(frozen=True)
class Profile:
    name: str
    device: str
    deadline_s: float | None  # the whole check; None: no overall limit
    model: str
    batch_size: int
    image_size: int
    dtype: str
    steps: int
    warmup: int
    providers: dict  # step -> comma-separated providers
    budgets: dict  # step -> --budget spec ("" for none)
    layer_budget: str
    autotune_shape_s: float | None
    autotune_run_s: float | None
    build: bool  # build for real (else a stand-in command)
    sanitizer: bool  # memcheck under compute-sanitizer (else the workload alone)
    tests: str  # "cuda" | "all" | "rehearsal"
    step_cap_s: float = 540.0
    memory: bool = True  # each provider's peak-memory step (on the CPU it goes through the profiler: slow)
    env: dict = field(default_factory=dict)  # for every step's process


PROFILES = {
    "lease": Profile(
        name="lease", device="cuda", deadline_s=570.0, model="resnet50", batch_size=256, image_size=224,
        dtype="bf16", steps=10, warmup=3,
        # Triton before cuDNN: the project's own conv is the figure most wanted,
        # and cuDNN's runtime-compiled graphs are the least known cost.
        providers={"bench-infer": "amp,fused-cuda,fused-triton,fused-cudnn",
                   "bench-train": "amp,fused-cuda,fused-triton,fused-triton+prologue,fused-cudnn",
                   # Beside compile, the backends the bench steps have already
                   # compiled and tuned (cheap now); eager AMP is in those steps.
                   "compile": "compile,fused-cuda,fused-triton"},
        budgets={"bench-infer": "amp=30,fused-cuda=30,fused-triton=75,fused-cudnn=60",
                 "bench-train": "amp=30,fused-cuda=30,fused-triton=75,fused-triton+prologue=60,fused-cudnn=75",
                 "compile": "compile=180,30"},
        layer_budget="30", autotune_shape_s=10.0, autotune_run_s=30.0, build=True, sanitizer=True, tests="cuda"),
    "full": Profile(
        name="full", device="cuda", deadline_s=None, model="resnet50", batch_size=256, image_size=224,
        dtype="bf16", steps=20, warmup=5,
        providers={"bench-infer": "amp,fused-cuda,fused-triton,fused-cudnn",
                   "bench-train": "amp,fused-cuda,fused-triton,fused-triton+prologue,fused-cudnn",
                   "compile": "amp,compile,fused-cuda,fused-cudnn,fused-triton"},
        budgets={"bench-infer": "", "bench-train": "", "compile": ""}, layer_budget="",
        autotune_shape_s=None, autotune_run_s=None, build=True, sanitizer=True, tests="all"),
    "rehearsal": Profile(
        name="rehearsal", device="cpu", deadline_s=240.0, model="resnet18", batch_size=4, image_size=64,
        dtype="fp32", steps=1, warmup=1,
        # amp: a provider that cannot run on the CPU, listed as unavailable.
        providers={"bench-infer": "eager,channels_last,fused-cpu,amp",
                   "bench-train": "eager,fused-cpu",
                   "compile": "fused-cpu"},
        # channels_last's budget of 0 s runs out at once: the rehearsal sees an
        # over-budget row and the providers after it still run.
        budgets={"bench-infer": "channels_last=0,60", "bench-train": "60", "compile": "60"},
        layer_budget="60", autotune_shape_s=5.0, autotune_run_s=10.0, build=False, sanitizer=False,
        tests="rehearsal", step_cap_s=120.0, memory=False,
        # One thread: on a 2-core machine shared with other jobs, two spinning
        # OpenMP threads made a tiny training step 10x slower.
        env={"OMP_NUM_THREADS": "1"}),
}


@dataclass
class Context:
    """Where and with what a plan runs."""

    python: str
    root: str  # the repository
    work: str  # scratch: step outputs, caches, the autotune log
    cores: int
    arch: str  # TORCH_CUDA_ARCH_LIST for the build ("9.0" on an H100)
    wheels: list[str]  # wheel files to install first
    site: str  # where the wheels go (--target)

    @classmethod
    def here(cls, root: str, work: str, arch: str, wheels_dir: str, site: str) -> Context:
        wheels = sorted(os.path.join(wheels_dir, f) for f in os.listdir(wheels_dir)
                        if f.endswith(".whl")) if os.path.isdir(wheels_dir) else []
        return cls(python=sys.executable, root=root, work=work, cores=os.cpu_count() or 1, arch=arch,
                   wheels=wheels, site=site)


def autotune_log(ctx: Context) -> str:
    return os.path.join(ctx.work, "autotune.log")


def cache_dir(ctx: Context) -> str:
    """The Triton autotune cache of every step (seeded from the last record)."""
    return os.path.join(ctx.work, "cache")


def _tuning_env(p: Profile, ctx: Context) -> dict[str, str]:
    """The figure steps' tuning caps and log (triton/autotune_budget.py); the
    test steps keep the defaults their tests expect."""
    env = {"FUSED_RESNET_AUTOTUNE_LOG": autotune_log(ctx)}
    if p.autotune_shape_s is not None:
        env["FUSED_RESNET_AUTOTUNE_SHAPE_S"] = f"{p.autotune_shape_s:g}"
    if p.autotune_run_s is not None:
        env["FUSED_RESNET_AUTOTUNE_RUN_S"] = f"{p.autotune_run_s:g}"
    return env


def _bench_argv(p: Profile, ctx: Context, mode: str, step: str, out: str) -> list[str]:
    argv = [ctx.python, "-m", "fused_resnet", "bench", "--device", p.device, "--model", p.model,
            "--batch-size", str(p.batch_size), "--image-size", str(p.image_size), "--dtype", p.dtype,
            "--mode", mode, "--providers", p.providers[step], "--steps", str(p.steps), "--warmup", str(p.warmup),
            # Each provider's row is final, and on disk, before the next is built.
            "--sequential", "--compile-mode", "default", "--quiet", "--json", out]
    if p.budgets.get(step):
        argv += ["--budget", p.budgets[step]]
    if not p.memory:
        argv.append("--no-memory")
    if step != "compile":
        argv += ["--layers"] + (["--layer-budget", p.layer_budget] if p.layer_budget else [])
    return argv


def _cap(p: Profile, figure: Figure) -> float:
    """A figure step's limit: twice its estimate, at least a minute more,
    within the profile's cap per step. Its providers' budgets end it sooner
    in the normal case; this stops one call that hangs."""
    if p.deadline_s is None or p.device != "cuda":
        return p.step_cap_s
    return min(p.step_cap_s, max(2 * figure.seconds, figure.seconds + 60))


def _stand_in(ctx: Context, text: str) -> list[str]:
    return [ctx.python, "-c", f"print({text!r})"]


def make_plan(p: Profile, ctx: Context) -> list[Step]:
    units = _units(p)
    est = _Estimator(p, units)
    py = ctx.python
    steps: list[Step] = []
    if ctx.wheels:
        argv = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                "--upgrade", "--target", ctx.site, *ctx.wheels]
    else:
        argv = _stand_in(ctx, "no wheels carried in .whl/ (make gpu-wheels)")
    steps.append(Step("wheels", f"install {len(ctx.wheels)} carried wheel(s) into {ctx.site}", argv,
                      costs.WHEEL_INSTALL if ctx.wheels else Figure(1.0, "nothing to install"), cap_s=90))
    build_env = {"MAX_JOBS": str(ctx.cores), "TORCH_CUDA_ARCH_LIST": ctx.arch}
    if p.build:
        argv = [py, "setup.py", "-q", "build_ext", "--inplace"]
        figure = costs.build_seconds()
    else:
        argv = _stand_in(ctx, "rehearsal: the extension is make build's")
        figure = Figure(1.0, "a stand-in command")
    steps.append(Step("build", f"the extension for sm {ctx.arch or '(none: CPU)'} with a job per core ({ctx.cores} "
                               "here), the cudnn backend included where the frontend headers are found", argv, figure,
                      cap_s=300, env=build_env))
    for name, mode, result in (("bench-infer", "inference", "bench_inference"), ("bench-train", "train", "bench_train")):
        out = os.path.join(ctx.work, f"{name}.json")
        figure = est.bench(name, mode)
        steps.append(Step(name, f"fused-resnet bench {mode}: {p.providers[name]}, then each conv unit per fused "
                                "backend (--layers)", _bench_argv(p, ctx, mode, name, out), figure,
                          cap_s=_cap(p, figure), env=_tuning_env(p, ctx), result=result, output=out, min_s=30))
    out = os.path.join(ctx.work, "compile.json")
    figure = est.compile()
    steps.append(Step("compile", f"fused-resnet bench, inference then training: {p.providers['compile']} (torch."
                                 "compile in its default mode, with freezing for inference, beside fused backends "
                                 "whose caches are warm)", _bench_argv(p, ctx, "both", "compile", out), figure,
                      cap_s=_cap(p, figure), env=_tuning_env(p, ctx), result="bench_compile", output=out,
                      min_s=30))
    steps += _test_steps(p, ctx)
    return steps


def _test_steps(p: Profile, ctx: Context) -> list[Step]:
    py = ctx.python
    pytest = [py, "-m", "pytest", "-p", "no:cacheprovider", "-rfE"]
    workers = ["-n", str(max(1, min(8, ctx.cores // 2)))]
    memcheck = [py, "-m", "fused_resnet.tools.gpu_check.memcheck", "--device", p.device]
    if p.sanitizer:
        memcheck = [_sanitizer(), "--tool", "memcheck", "--error-exitcode", "3", "--print-limit", "20", *memcheck]
    memcheck_est = Figure(45.0, "45 s allowance: python + torch under compute-sanitizer, a few small kernels")
    if p.tests == "rehearsal":
        smoke = [*pytest, "-v", "tests/ops/test_add_relu.py", "-k", "test_matches_eager_bitwise[False-dtype0]"]
        rest = [*pytest, "-v", "tests/ops/test_add_relu.py", "-k", "test_odd_sizes_views_and_nan"]
        memcheck_est = Figure(10.0, "the memcheck workload on the CPU, no sanitizer")
        smoke_est = rest_est = Figure(10.0, "one CPU test")
    else:
        smoke = [*pytest, "-v", *selection.smoke_files(), "-k", selection.smoke_k()]
        smoke_est = Figure(60.0, f"{len(selection.SMOKE)} tests, one process: 15 s start + ~3 s each (a Triton "
                                 "compile or a cuDNN plan apiece)")
        k = selection.CUDA_TESTS_K if p.tests == "cuda" else selection.ALL_TESTS_K
        rest = [*pytest, "-v", "tests", *workers, "-k", f"({k}) and not ({selection.smoke_k()})", "--timeout", "120"]
        rest_est = Figure(240.0, "the time left: the CUDA tests took more than 270 s with 8 workers on the H100 "
                                 "(2026-11-23); they stop where the time runs out")
    return [
        Step("smoke-tests", "one fast test per op and backend", smoke, smoke_est, cap_s=180, tests=True, min_s=30),
        Step("cuda-tests" if p.tests != "rehearsal" else "tests", "the CUDA tests, with the time left", rest,
             rest_est, cap_s=p.step_cap_s, tests=True, fill=p.deadline_s is not None, min_s=30),
        Step("memcheck", "compute-sanitizer memcheck on the CUDA BatchNorm kernels at small shapes"
             if p.sanitizer else "the memcheck workload without the sanitizer", memcheck, memcheck_est, cap_s=120,
             tests=True, min_s=30),
    ]


def _sanitizer() -> str:
    """compute-sanitizer from PATH, else from the CUDA toolkit."""
    import shutil

    found = shutil.which("compute-sanitizer")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return os.path.join(home, "bin", "compute-sanitizer")


def _units(p: Profile):
    from ..bench.layers import network_units

    return network_units(p.model, p.batch_size, p.image_size)


class _Estimator:
    """Step estimates from costs.py's figures and the network's work."""

    def __init__(self, p: Profile, units):
        self.p, self.units = p, units
        self.gpu = p.device == "cuda"

    def _step_s(self, mode: str) -> float:
        return costs.STEP_TRAIN_S if mode == "train" else costs.STEP_INFERENCE_S

    def _provider(self, name: str, mode: str, tuned, budget: float | None) -> tuple[float, str, dict]:
        steps = self.p.warmup - 1 + self.p.steps + 1  # warm-up after the first call, timed, peak memory
        run = steps * self._step_s(mode)
        first, why = 3.0, "3 s allowance (cuDNN heuristics per conv shape)"
        if name == "fused-cudnn":
            f = costs.cudnn_graphs(self.units, mode)
            first, why = f.seconds, f.basis
        elif name.startswith("fused-triton") and tuned == "on disk":
            first, why = 5.0, "5 s: Triton's kernels and autotune choices are on disk from the bench steps"
        elif name.startswith("fused-triton"):
            work = costs.triton_work(self.units, mode, prologue=name.endswith("+prologue"))
            new = costs.new_work(work, tuned)
            f = costs.triton_first_call(new, self.p.autotune_run_s)
            first, why = f.seconds, f.basis
            tuned = {part: {**(tuned or {}).get(part, {}), **work[part]} for part in ("keys", "variants")}
        elif name == "compile":
            f = costs.COMPILE_TRAIN if mode == "train" else costs.COMPILE_INFERENCE
            first, why = f.seconds, f.basis
        total = costs.MODEL_BUILD.seconds + first + run
        text = f"{name} {total:.0f} s (first call: {why})"
        if budget is not None and total > budget:
            total = budget + self._step_s(mode)
            text = f"{name} {total:.0f} s (its budget; first call: {why})"
        return total, text, tuned

    def _budgets(self, step: str) -> dict:
        from ..cli import parse_budgets

        return parse_budgets(self.p.budgets.get(step) or None) or {}

    def _mode(self, step: str, mode: str, tuned) -> tuple[float, list[str], dict | None]:
        """tuned: the Triton work done earlier in the process (None: none), or
        "on disk" when the bench steps have tuned and compiled it all."""
        budgets = self._budgets(step)
        total, parts = 0.0, []
        for name in self.p.providers[step].split(","):
            if name == "fused-triton+prologue" and mode != "train":
                continue
            if name == "amp" and not self.gpu:
                continue
            s, text, tuned = self._provider(name, mode, tuned, budgets.get(name, budgets.get("*")))
            total += s
            parts.append(text)
        return total, parts, tuned

    def bench(self, step: str, mode: str) -> Figure:
        if not self.gpu:
            return Figure(10.0, "CPU rehearsal at tiny sizes")
        start = costs.process_start() + 3.0
        total, parts, _ = self._mode(step, mode, None)
        layers = self._layers(step, mode)
        return Figure(start + total + layers.seconds,
                      f"process {start:.0f} s ({costs.IMPORT.basis}; {costs.CUDA_INIT.basis}; 3 s reference and "
                      f"input); " + "; ".join(parts) + f"; {costs.STEP_BASIS}; per-layer {layers.basis}")

    def _layers(self, step: str, mode: str) -> Figure:
        from ..bench.layers import distinct_units

        n = len(distinct_units(self.units))
        backends = 1 + sum(1 for x in self.p.providers[step].split(",") if x.startswith("fused-")
                           and not x.endswith("+prologue"))
        calls = 1 + self.p.warmup - 1 + self.p.steps
        # A unit's step: the network's step shared out over its 53 units, doubled.
        unit_s = 2 * self._step_s(mode) / len(self.units)
        seconds = 3.0 + n * backends * (calls * unit_s + 0.1)
        return Figure(seconds, f"{seconds:.0f} s: 3 s device peaks + {n} distinct units x {backends} backends x "
                               f"({calls} calls x {unit_s * 1e3:.1f} ms + 0.1 s set-up); the network run has "
                               "filled the caches")

    def compile(self) -> Figure:
        if not self.gpu:
            return Figure(10.0, "CPU rehearsal at tiny sizes")
        start = costs.process_start() + 3.0
        ti, pi, _ = self._mode("compile", "inference", "on disk")
        tt, pt, _ = self._mode("compile", "train", "on disk")
        return Figure(start + ti + tt, f"process {start:.0f} s; inference: " + "; ".join(pi) + "; training: "
                      + "; ".join(pt))


def pre_test_seconds(steps: list[Step]) -> float:
    return sum(s.estimate.seconds for s in steps if not s.tests)


def format_plan(p: Profile, steps: list[Step]) -> str:
    lines = [f"gpu-check plan, profile {p.name}: {p.model}, batch {p.batch_size}, {p.image_size}x{p.image_size}, "
             f"{p.dtype}, channels_last, {p.steps} timed steps after {p.warmup} warm-up"
             + (f"; the whole check ends by {p.deadline_s:.0f} s" if p.deadline_s else "; no overall deadline"), "",
             f"{'step':<12} {'est s':>6} {'cum s':>6} {'cap s':>6}  what"]
    cum = 0.0
    for s in steps:
        if s.tests and not any(x.tests for x in steps[:steps.index(s)]):
            lines.append(f"{'-' * 12} {'-' * 6} {'-' * 6} {'-' * 6}  figures above: {cum:.0f} s estimated "
                         f"(limit {PRE_TEST_LIMIT_S} s); tests below take the time left")
        cum += s.estimate.seconds
        cap = "left" if s.fill else f"{s.cap_s:.0f}"
        lines.append(f"{s.name:<12} {s.estimate.seconds:>6.0f} {cum:>6.0f} {cap:>6}  {s.what}")
    lines += ["", "Basis of each estimate:"]
    for s in steps:
        lines.append(f"  {s.name}: {s.estimate.basis}")
    return "\n".join(lines)
