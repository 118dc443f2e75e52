"""Autotune candidates for conv2d_fwd_kernel, per architecture, and the shape
bucket an autotune result is keyed on.

Every config listed here is compiled for sm_80 and sm_90 by
tests/backends/triton/test_triton_aot.py (ptxas: no spills, shared memory within the limit);
a config that fails there is removed from this file, not skipped.

Shared memory per config is about num_stages * (BM*BK + BK*BN) * itemsize, so
BLOCK_K is halved for 4-byte (fp32/TF32) inputs: the same tile shapes then fit
the same budget.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ConvConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return (f"m{self.block_m}n{self.block_n}k{self.block_k}"
                f"g{self.group_m}w{self.num_warps}s{self.num_stages}")

    def meta(self) -> dict:
        """The kernel's constexpr tile arguments."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m)


def _c(bm, bn, bk, warps, stages, gm=8):
    return ConvConfig(bm, bn, bk, gm, warps, stages)


# Kept from the ptxas report of tests/backends/triton/test_triton_aot.py (all-epilogue
# variant, the heaviest): every dense config keeps the fp32 accumulator at
# <= 64 values per thread (128x128 tiles on 8 warps, 64x128 or 128x64 on 4).
# With 128 per thread (128x256 or 256x128 on 8 warps, 128x128 on 4) the
# residual tile + statistics epilogue spilled 130-450 bytes at 255 registers
# on both archs, so those were removed. The lists are short on purpose: each
# entry is timed at the first call of every new shape bucket.
# Hopper: 227 KB of shared memory per block, deep K tiles (wgmma).
SM90_DENSE = [
    _c(128, 128, 64, 8, 4),   # the large-M workhorse: 128 KB smem, ~196 regs, 1 block/SM
    _c(64, 256, 64, 8, 3),    # wide C_out (256..2048): 120 KB smem
    _c(128, 64, 64, 4, 4),    # 96 KB, ~190 regs: 2 blocks/SM by shared memory
    _c(64, 128, 64, 4, 4),
    _c(64, 64, 64, 4, 4),     # small M (batch 1, 7x7 maps): more tiles in flight, ~100 regs
]
# Ampere: mma.sync, 163 KB of shared memory per block; shallower K tile.
SM80_DENSE = [
    _c(128, 128, 32, 8, 4),
    _c(64, 256, 32, 8, 3),
    _c(128, 64, 32, 4, 4),
    _c(64, 128, 32, 4, 4),
    _c(64, 64, 32, 4, 4),
]
# Thin output groups (ResNeXt: COUT_G 4..32) waste most of a wide N tile:
# narrow N, more rows.
SM90_NARROW = [
    _c(128, 32, 32, 4, 4),
    _c(64, 32, 64, 4, 4),
]
SM80_NARROW = [
    _c(128, 32, 32, 4, 4),
    _c(64, 32, 32, 4, 4),
]

# The one config under TRITON_INTERPRET=1: small enough that tiny test shapes
# still span several row tiles, column tiles and K steps.
INTERPRETER = ConvConfig(block_m=32, block_n=16, block_k=16, group_m=2, num_warps=4, num_stages=1)

NARROW_COUT_G = 32


def arch_family(capability: tuple[int, int]) -> int:
    """80 or 90: which list a device with this compute capability uses."""
    major, _ = capability
    return 90 if major >= 9 else 80


def candidates(arch: int, itemsize: int, cout_g: int) -> list[ConvConfig]:
    """Autotune candidates for an arch family (80/90), the input element size
    in bytes, and the output channels per group."""
    if arch >= 90:
        base = SM90_NARROW if cout_g <= NARROW_COUT_G else SM90_DENSE
    else:
        base = SM80_NARROW if cout_g <= NARROW_COUT_G else SM80_DENSE
    if itemsize >= 4:
        base = [replace(c, block_k=max(16, c.block_k // 2)) for c in base]
    # Halving K can make two entries equal; keep the first.
    seen, out = set(), []
    for c in base:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


# The fused data gradient's epilogue (conv2d_dgrad_prologue_kernel) keeps
# x_prev's tile, the recomputed activation and two products live beside the
# accumulator: at 64 fp32 accumulator values per thread (m128n128w8,
# m64n256w8, m64n128w4) ptxas spilled on sm_90 (tests/backends/triton/test_triton_aot.py),
# so its tiles hold at most this many per thread.
DGRAD_MAX_ACC_PER_THREAD = 32


def _acc_per_thread(c: ConvConfig) -> int:
    return c.block_m * c.block_n // (32 * c.num_warps)


def dgrad_candidates(arch: int, itemsize: int, cout_g: int) -> list[ConvConfig]:
    """candidates() for conv2d_dgrad_prologue_kernel (cout_g: the data
    gradient's output channels per group, i.e. the forward conv's Cin_g),
    each with its warps doubled where its tile would hold more than
    DGRAD_MAX_ACC_PER_THREAD accumulator values per thread: the same tiles,
    spread over more threads."""
    out = []
    for c in candidates(arch, itemsize, cout_g):
        # 16 warps cap a thread at 128 registers: the 16-warp variants of
        # the 128x128 and 64x256 tiles spilled on sm_90 in bf16, so 8 is the most.
        while _acc_per_thread(c) > DGRAD_MAX_ACC_PER_THREAD and c.num_warps < 8:
            c = replace(c, num_warps=c.num_warps * 2)
        if _acc_per_thread(c) <= DGRAD_MAX_ACC_PER_THREAD and c not in out:
            out.append(c)
    return out


def all_configs(arch: int, kernel: str = "fwd") -> list[tuple[int, ConvConfig]]:
    """Every (itemsize, config) that can be launched on the arch family for
    the forward kernels (kernel="fwd") or the fused data gradient ("dgrad"):
    what the AOT test compiles."""
    pick = dgrad_candidates if kernel == "dgrad" else candidates
    out = []
    for itemsize in (2, 4):
        for cout_g in (NARROW_COUT_G, NARROW_COUT_G + 1):
            for c in pick(arch, itemsize, cout_g):
                if (itemsize, c) not in out:
                    out.append((itemsize, c))
    return out


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def shape_bucket(m: int, c_in: int, c_out: int, kh: int, kw: int, stride, dilation, groups: int,
                 epilogue: str) -> str:
    """The part of the autotune key that depends on the problem. M (batch x
    output pixels) is rounded up to a power of two so a new batch size or
    resolution reuses a nearby result; channel counts, filter, stride,
    dilation, groups and the epilogue's weight (stats/residual add registers
    and traffic) are exact."""
    return (f"M{_next_pow2(m)}-Ci{c_in}-Co{c_out}-k{kh}x{kw}-s{stride[0]}x{stride[1]}"
            f"-d{dilation[0]}x{dilation[1]}-g{groups}-{epilogue}")
