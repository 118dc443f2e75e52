"""What each step of the GPU check is expected to cost, and on what basis.

No figure here was measured on the GPU machine except the build's; the rest
were measured on the project's 2-core CPU machine (the CI box) or derived
from counts of the work a step does, and each says which. `--plan` prints
them. They err long where they guess: a step finishing early leaves time to
the tests; one running long is cut by its cap, which is what protects the
lease, not the estimate.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    seconds: float
    basis: str


# --- measured ----------------------------------------------------------------

H100_BUILD = Figure(55.0, "55 s measured on the H100, 2026-11-23 (one architecture, 16 jobs, without the cudnn "
                          "files: the frontend headers were missing there)")
# Longest cudnn translation unit minus the longest other one, each compiled
# alone on one core of the CI box (2026-12-06): what the cudnn files add to a
# build with a job per file. Before the split the single cudnn file took
# 74.5 s against bn_backward.cpp's 34.9 s; after it, 41.5 s (graph_common).
# A second series, all files in one run on a busier machine, gave 106.1 s
# before, at most 43.7 s after, and 44.9 s for bn_backward.cpp (the cudnn
# files then add nothing); the first series is the one used.
CUDNN_TU_LONGEST = 41.5
OTHER_TU_LONGEST = 34.9
IMPORT = Figure(5.0, "5 s: python -c 'import torch, torchvision, fused_resnet' measured at 4.2-5.4 s on the "
                     "CI box")
CUDA_INIT = Figure(5.0, "5 s allowance for the CUDA context and the cuBLAS/cuDNN handles (not measurable "
                        "without a GPU)")
MODEL_BUILD = Figure(1.5, "1.5 s: resnet50 build + load_state_dict measured at 1.0 s on the CI box, plus the "
                          "copy to the GPU")
WHEEL_INSTALL = Figure(6.0, "6 s: pip install --target of the 11.6 MB frontend wheel took 1.4 s on the CI box")
TRITON_COMPILE = Figure(1.5, "1.5 s per Triton conv config: AOT compile for sm_90 measured at 0.9-2.4 s on "
                             "the CI box (tests/backends/triton/test_triton_aot.py's path)")
# torch.compile's first call, resnet50, default mode, measured on the CI box
# with an empty inductor cache (batch 2, 64x64: tracing, AOT autograd and
# lowering do not depend on the batch). On the GPU inductor compiles Triton
# kernels in 16 workers where here it compiled C++ on two cores: taken as
# even, since neither was measured against the other.
COMPILE_INFERENCE = Figure(27.0, "27 s: inference with freezing, measured with an empty inductor cache on the "
                                 "CI box (25.9 and 26.8 s)")
COMPILE_TRAIN = Figure(77.0, "77 s: a training step, measured with an empty inductor cache on the CI box (the "
                             "GPU's Triton kernel compiles, in 16 workers, taken as even with the CPU's C++)")

# --- derived ---------------------------------------------------------------

# do_bench(warmup=5 ms, rep=25 ms) per candidate: 5 estimate runs, then
# about 30 ms of repetitions, L2 flushes included (launch.py's settings).
DO_BENCH = Figure(0.04, "0.04 s per candidate: do_bench's 5 ms warm-up + 25 ms repetitions + 5 estimate runs")
# cuDNN's runtime-fusion engines compile a kernel per graph (NVRTC) when the
# plan is built; the plain data/weight-gradient graphs pick a precompiled one.
CUDNN_FUSED_GRAPH = Figure(1.0, "1 s allowance per runtime-fusion graph (plan build with NVRTC; not measured)")
CUDNN_PLAIN_GRAPH = Figure(0.3, "0.3 s allowance per dgrad/wgrad graph (heuristics + plan build; not measured)")
# Step times of resnet50 at batch 256, bf16, on an H100: the targets
# imply eager AMP training at about 5,000 / 1.5 = 3,333 images/s; inference
# is taken at 10,000 images/s. Every provider is assumed this slow, which
# errs long (the steps are a small part of each estimate anyway).
STEP_TRAIN_S = 256 / 3333
STEP_INFERENCE_S = 256 / 10000
STEP_BASIS = ("steps at eager AMP speed for every provider: 77 ms training (the issue's 5,000 images/s target "
              "/ 1.5), 26 ms inference (10,000 images/s assumed)")


def build_seconds() -> Figure:
    extra = max(0.0, CUDNN_TU_LONGEST - OTHER_TU_LONGEST)
    return Figure(H100_BUILD.seconds + extra,
                  f"{H100_BUILD.basis}; + {extra:.1f} s for the cudnn files (their longest translation unit "
                  f"{CUDNN_TU_LONGEST} s vs the longest other {OTHER_TU_LONGEST} s, each alone on the CI box)")


def process_start() -> float:
    return IMPORT.seconds + CUDA_INIT.seconds


# --- the work of a step, counted from the network --------------------------


def _pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def triton_work(units, mode: str, prologue: bool = False, shortcut_gemm: bool = True) -> dict:
    """What the Triton backend tunes and compiles on its first call of the
    network in `mode`: {"keys": {autotune key: candidates}, "variants":
    {kernel variant: configs}}. A key is a shape bucket; a variant is what
    Triton compiles once per config (the kernel, its constexprs and the
    integer arguments it specialises: == 1, divisible by 16). `units`:
    bench/layers.network_units()."""
    from ...backends.triton import conv_configs

    keys: dict[tuple, int] = {}
    variants: dict[tuple, int] = {}
    blocks_with_ds = {u.name.rsplit(".", 2)[0] for u in units if u.role == "downsample"}

    def add(kernel: str, u, epilogue: tuple, pick=conv_configs.candidates, cout_g=None):
        n, _, h, w = u.in_shape
        _, _, oh, ow = u.out_shape
        cands = len(pick(90, 2, cout_g or u.out_channels // u.groups))
        keys[(kernel, _pow2(n * oh * ow), u.in_channels, u.out_channels, u.kernel, u.stride, epilogue)] = cands
        gemm = u.kernel == (1, 1) and u.stride == (1, 1) and u.padding == (0, 0)
        kmode = "gemm" if gemm else ("flat" if u.in_channels // u.groups < 32 else "cblock")
        spec = (u.stride[0] == 1, u.padding[0] == 1, h % 16 == 0, w % 16 == 0, oh % 16 == 0, ow % 16 == 0)
        variants[(kernel, u.kernel, kmode, epilogue, spec)] = cands

    for u in units:
        block = u.name.rsplit(".", 1)[0]
        if mode == "inference":
            if u.role == "downsample" and shortcut_gemm:
                continue  # accumulated into the block's last conv
            if u.role == "last" and shortcut_gemm and block in blocks_with_ds:
                add("shortcut", u, ("shift", "relu"))
            else:
                add("fwd", u, ("shift", "res", "relu") if u.role == "last" else
                    ("shift",) if u.role == "downsample" else ("shift", "relu"))
        else:
            in_prologue = prologue and u.role in ("inner", "last") and not u.name.endswith("conv1")
            add("prologue" if in_prologue else "fwd", u, ("stats",))
            if in_prologue and u.stride == (1, 1):
                add("dgrad", u, ("dgrad",), pick=conv_configs.dgrad_candidates, cout_g=u.in_channels // u.groups)
    return {"keys": keys, "variants": variants}


def new_work(work: dict, done: dict | None) -> dict:
    """The part of `work` that `done` (tuned and compiled earlier in the same
    process) has not covered."""
    if not done:
        return work
    return {part: {k: v for k, v in work[part].items() if k not in done[part]} for part in ("keys", "variants")}


def triton_first_call(work: dict, run_budget_s: float | None) -> Figure:
    """Seconds of a first call spent tuning and compiling `work`, within a
    tuning budget (once spent, each further variant compiles its first
    config only)."""
    nk, nv = len(work["keys"]), len(work["variants"])
    kc, vc = sum(work["keys"].values()), sum(work["variants"].values())
    timing, compiling = kc * DO_BENCH.seconds, vc * TRITON_COMPILE.seconds
    full = timing + compiling
    text = (f"{nk} autotune keys x {kc / max(nk, 1):.0f} candidates x {DO_BENCH.seconds} s + {nv} kernel variants "
            f"x {vc / max(nv, 1):.0f} configs x {TRITON_COMPILE.seconds} s compile = {full:.0f} s")
    if run_budget_s is None or full <= run_budget_s:
        return Figure(full, text)
    left = nv * (1 - run_budget_s / full)  # variants reached after the budget: one compile each
    return Figure(run_budget_s + left * TRITON_COMPILE.seconds,
                  f"{text}, capped by the {run_budget_s:g} s tuning budget + {left:.0f} untimed first-config "
                  "compiles")


def cudnn_graphs(units, mode: str) -> Figure:
    """Graphs the cudnn backend builds on its first call of the network."""
    from ..bench.layers import distinct_units

    distinct = [u for u, _ in distinct_units(units)]
    if mode == "inference":
        n = len(distinct)
        return Figure(n * CUDNN_FUSED_GRAPH.seconds, f"{n} conv+epilogue graphs x {CUDNN_FUSED_GRAPH.seconds} s "
                                                     "(runtime fusion, allowance)")
    plain = len(distinct) + sum(1 for u in distinct if u.role != "stem")
    fused = len(distinct)
    return Figure(fused * CUDNN_FUSED_GRAPH.seconds + plain * CUDNN_PLAIN_GRAPH.seconds,
                  f"{fused} conv+statistics graphs x {CUDNN_FUSED_GRAPH.seconds} s + {plain} dgrad/wgrad graphs x "
                  f"{CUDNN_PLAIN_GRAPH.seconds} s (allowances)")
