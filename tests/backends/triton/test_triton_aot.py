"""Ahead-of-time compilation of every autotune config of the Triton conv for
sm_80 and sm_90, with no GPU: triton.compile(..., target=GPUTarget("cuda", cc,
32)), then `ptxas -v` on the PTX. Every config must compile with no spill
stores, shared memory within the architecture's per-block limit, and a
register file that holds one block. A config that fails is removed from
fused_resnet/triton/conv_configs.py, never skipped here.

Variants compiled per config: the heaviest epilogue (scale, shift, residual,
ReLU and statistics) always, for conv2d_fwd_kernel and (bf16 and fp32,
MODE_CBLOCK) for conv2d_fwd_prologue_kernel, whose BN + ReLU prologue adds
registers in the K loop, and for conv2d_dgrad_prologue_kernel over its own
candidates (conv_configs.dgrad_candidates: its epilogue keeps x_prev's tile
and two products live); lighter epilogues only drop code from it, and an
earlier run of every config with no epilogue, and of fp32 with IEEE dots,
used fewer registers than these. Kept within ~2 minutes cold on 2 cores:
  16-bit configs: bf16 in MODE_GEMM, MODE_CBLOCK and MODE_FLAT; fp16 in
                  MODE_CBLOCK (its conversions cost registers bf16's do not);
  fp32 configs:   TF32 dots in MODE_CBLOCK.
Integer arguments are marked divisible by 16 as Triton's launcher marks them
for ResNet channel counts, so the PTX is the pipelined (cp.async) kernel that
actually runs; without that hint Triton does not pipeline at all.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor

import pytest

triton = pytest.importorskip("triton")

from fused_resnet.backends.triton import conv_configs  # noqa: E402
from helpers import find_ptxas  # noqa: E402

# Per-block shared memory limits (opt-in maximum): A100 163 KB, H100 227 KB.
ARCHS = {80: ("sm_80", 163 * 1024), 90: ("sm_90a", 227 * 1024)}
REGISTERS_PER_SM = 65536

_INT_ARGS = "M H W C_in OH OW C_out CIN_G COUT_G stride_h stride_w pad_h pad_w dil_h dil_w".split()
_PTR_ARGS = ("x_ptr w_ptr y_ptr scale_ptr shift_ptr res_ptr psum_ptr psumsq_ptr pre_scale_ptr pre_shift_ptr "
             "dz_ptr dx_ptr x_prev_ptr").split()
_CONSTEXPRS = ("KH KW MODE HAS_SCALE HAS_SHIFT HAS_RESIDUAL RELU EMIT_STATS INPUT_PRECISION "
               "BLOCK_M BLOCK_N BLOCK_K GROUP_M").split()
_DIVISIBLE = set(_PTR_ARGS) | {"C_in", "C_out", "CIN_G", "COUT_G"}



def _jobs(arch: int) -> list[dict]:
    from fused_resnet.backends.triton.conv2d_fwd import MODE_CBLOCK, MODE_FLAT, MODE_GEMM

    heavy = dict(HAS_SCALE=True, HAS_SHIFT=True, HAS_RESIDUAL=True, RELU=True, EMIT_STATS=True)
    jobs = []
    for itemsize, cfg in conv_configs.all_configs(arch, "dgrad"):
        dtype = "bf16" if itemsize == 2 else "fp32"
        jobs.append(dict(arch=arch, cfg=cfg, dtype=dtype, mode=MODE_CBLOCK, prec="tf32", epi={}, kernel="dgrad",
                         label=f"sm{arch} {cfg.name} {dtype}/tf32 mode{MODE_CBLOCK} dgrad-epilogue dgrad"))
    for itemsize, cfg in conv_configs.all_configs(arch):
        if itemsize == 2:
            variants = [("bf16", MODE_GEMM, "tf32", heavy, "plain"), ("bf16", MODE_CBLOCK, "tf32", heavy, "plain"),
                        ("bf16", MODE_FLAT, "tf32", heavy, "plain"), ("fp16", MODE_CBLOCK, "tf32", heavy, "plain"),
                        ("bf16", MODE_CBLOCK, "tf32", heavy, "prologue")]
        else:
            variants = [("fp32", MODE_CBLOCK, "tf32", heavy, "plain"), ("fp32", MODE_CBLOCK, "tf32", heavy, "prologue")]
        for dtype, mode, prec, epi, kernel in variants:
            jobs.append(dict(arch=arch, cfg=cfg, dtype=dtype, mode=mode, prec=prec, epi=epi, kernel=kernel,
                             label=f"sm{arch} {cfg.name} {dtype}/{prec} mode{mode} all-epilogues {kernel}"))
    return jobs


def _compile_one(job: dict) -> dict:
    """In a worker process: compile one variant and read ptxas -v."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fused_resnet.backends.triton import conv2d_fwd

    kernel = {"prologue": conv2d_fwd.conv2d_fwd_prologue_kernel, "dgrad": conv2d_fwd.conv2d_dgrad_prologue_kernel,
              "plain": conv2d_fwd.conv2d_fwd_kernel}[job["kernel"]]
    cfg, dt = job["cfg"], job["dtype"]
    sig = {n: "*fp32" for n in _PTR_ARGS}
    sig.update({n: f"*{dt}" for n in ("x_ptr", "w_ptr", "y_ptr", "res_ptr", "dz_ptr", "dx_ptr", "x_prev_ptr")})
    sig.update({n: "i32" for n in _INT_ARGS})
    sig.update({n: "constexpr" for n in _CONSTEXPRS})
    names = list(kernel.arg_names)
    sig = {n: sig[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in _DIVISIBLE if n in names}
    consts = dict(KH=3, KW=3, MODE=job["mode"], INPUT_PRECISION=job["prec"], **job["epi"], **cfg.meta())
    ck = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                        target=GPUTarget("cuda", job["arch"], 32),
                        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(ck.asm["ptx"])
        proc = subprocess.run([job["ptxas"], "-v", f"-arch={ARCHS[job['arch']][0]}", ptx, "-o", os.devnull],
                              capture_output=True, text=True)
    report = proc.stderr
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return dict(label=job["label"], rc=proc.returncode, report=report, shared=int(ck.metadata.shared),
                regs=int(regs.group(1)) if regs else None, spill_stores=int(spills.group(1)) if spills else None,
                threads=32 * cfg.num_warps)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_config_compiles_without_spills(arch):
    ptxas = find_ptxas()
    if ptxas is None:
        pytest.skip("ptxas not found (CUDA_HOME/bin, PATH, or triton's bundled copy)")
    jobs = [dict(j, ptxas=ptxas) for j in _jobs(arch)]
    assert jobs, "no configs to compile"
    # Spawned workers (fork after torch is loaded is unsafe); compile is CPU-bound.
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_compile_one, jobs))
    limit = ARCHS[arch][1]
    failures = []
    for r in results:
        print(f"{r['label']:58s} regs {r['regs']} spill-stores {r['spill_stores']} shared {r['shared']}")
        if r["rc"] != 0 or r["regs"] is None or r["spill_stores"] is None:
            failures.append(f"{r['label']}: ptxas failed or gave no report:\n{r['report']}")
        elif r["spill_stores"] > 0:
            failures.append(f"{r['label']}: {r['spill_stores']} bytes of spill stores ({r['regs']} registers)")
        elif r["shared"] > limit:
            failures.append(f"{r['label']}: {r['shared']} bytes of shared memory > {limit}")
        elif r["regs"] * r["threads"] > REGISTERS_PER_SM:
            failures.append(f"{r['label']}: {r['regs']} registers x {r['threads']} threads exceed one SM")
    assert not failures, "configs to remove or fix in conv_configs.py:\n" + "\n".join(failures)
