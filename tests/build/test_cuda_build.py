"""The CUDA BatchNorm kernels as built, checked without a GPU.

setup.py compiles every CUDA object with `-Xptxas=-v` and tools/nvcc_logged.sh
keeps ptxas's report next to the object as <object>.o.ptxas.log. These tests
read those reports: every BatchNorm kernel must be compiled for sm_80 and
sm_90 with no register spills and no stack frame, and each BatchNorm op must
have a CUDA kernel registered whenever the extension was built with CUDA.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from dataclasses import dataclass

import pytest

from fused_resnet import _compat, dispatch
from helpers import REPO

ROOT = str(REPO)
BN_OPS = ("bn_stats", "bn_finalize", "bn_apply", "bn_backward", "relu_mask")
# Kernel source -> the __global__ functions it must define (as they appear,
# length-prefixed, in the mangled names).
BN_KERNELS = {
    "bn_stats_kernel": ("stats_rows_kernel", "stats_planes_kernel", "stats_combine_kernel"),
    "bn_finalize_kernel": ("finalize_kernel",),
    "bn_apply_kernel": ("apply_kernel",),
    "bn_backward_kernel": ("reduce_rows_kernel", "reduce_planes_kernel", "combine_kernel", "grad_kernel"),
    "relu_mask_kernel": ("relu_mask_kernel",),
}
ARCHS = ("sm_80", "sm_90")


def _extension_paths() -> list[str]:
    return glob.glob(os.path.join(ROOT, "fused_resnet", "_C*.so")) + glob.glob(
        os.path.join(ROOT, "fused_resnet", "_C*.pyd")
    )


def _built_with_cuda() -> bool:
    """The CUDA half of the extension is linked in: its launchers are in the
    binary (independent of whether any op registered)."""
    for path in _extension_paths():
        with open(path, "rb") as f:
            if b"add_relu_launch" in f.read():
                return True
    return False


def _log_path(stem: str) -> str | None:
    # The build of this interpreter (build/temp.<platform>-cpython-3XY/):
    # `make test-oldest` builds beside `make test`, with other options.
    build_dir = os.path.join(ROOT, "build", f"temp.*-{sys.implementation.cache_tag}")
    hits = glob.glob(os.path.join(build_dir, "**", "csrc", "cuda", f"{stem}.o.ptxas.log"), recursive=True)
    return max(hits, key=os.path.getmtime) if hits else None


@dataclass
class Entry:
    name: str
    arch: str
    stack: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    registers: int = -1


def parse_ptxas_log(text: str) -> list[Entry]:
    entries: list[Entry] = []
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'", line)
        if m:
            entries.append(Entry(m.group(1), m.group(2)))
            continue
        if not entries:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            e = entries[-1]
            e.stack, e.spill_stores, e.spill_loads = (int(g) for g in m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            entries[-1].registers = int(m.group(1))
    return entries


def test_parse_ptxas_log_reads_every_field():
    text = (
        "ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z3fooPf\n"
        "    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 0 barriers\n"
    )
    (e,) = parse_ptxas_log(text)
    assert (e.name, e.arch, e.stack, e.spill_stores, e.spill_loads, e.registers) == ("_Z3fooPf", "sm_90", 16, 8, 4, 255)


needs_cuda_build = pytest.mark.skipif(
    not _built_with_cuda(),
    reason="fused_resnet._C was built without CUDA (no nvcc, a CPU-only torch, or FUSED_RESNET_SKIP_CUDA=1)",
)


@needs_cuda_build
@pytest.mark.parametrize("op", BN_OPS)
def test_bn_op_has_cuda_kernel(op):
    assert dispatch.native_loaded()
    assert _compat.dispatcher_has_kernel(f"fused_resnet::{op}", "CUDA"), (
        f"fused_resnet::{op} has no CUDA kernel although the extension was built with CUDA"
    )


def _entries(stem: str) -> list[Entry]:
    path = _log_path(stem)
    assert path is not None, f"no ptxas log for {stem}.cu under build/: rebuild with `make build`"
    src = os.path.join(ROOT, "csrc", "cuda", f"{stem}.cu")
    assert os.path.getmtime(path) >= os.path.getmtime(src), (
        f"{path} is older than {src}: the checked code is stale, rebuild with `make build`"
    )
    with open(path) as f:
        entries = parse_ptxas_log(f.read())
    assert entries, f"{path} holds no ptxas report (was -Xptxas=-v dropped from the nvcc flags?)"
    return entries


@needs_cuda_build
@pytest.mark.parametrize("stem", sorted(BN_KERNELS))
def test_bn_kernels_have_no_spills_or_stack(stem):
    bad = [
        f"{e.arch} {e.name}: {e.stack} B stack, {e.spill_stores}/{e.spill_loads} B spill stores/loads, "
        f"{e.registers} registers"
        for e in _entries(stem)
        if e.stack != 0 or e.spill_stores != 0 or e.spill_loads != 0
    ]
    assert not bad, "ptxas reports spills or a stack frame (memory traffic in a bandwidth-bound kernel):\n" + "\n".join(
        bad
    )


@needs_cuda_build
@pytest.mark.parametrize("stem", sorted(BN_KERNELS))
def test_bn_kernels_built_for_sm80_and_sm90(stem):
    entries = _entries(stem)
    archs_by_name: dict[str, set[str]] = {}
    for e in entries:
        assert e.registers > 0, f"{e.arch} {e.name}: no register count in the ptxas report"
        archs_by_name.setdefault(e.name, set()).add(e.arch)
    missing = {name: sorted(set(ARCHS) - archs) for name, archs in archs_by_name.items() if not set(ARCHS) <= archs}
    assert not missing, f"kernels not compiled for every one of {ARCHS}: {missing}"
    for kernel in BN_KERNELS[stem]:
        mangled = f"{len(kernel)}{kernel}"
        assert any(mangled in name for name in archs_by_name), f"{stem}.cu: no {kernel} in the ptxas report"
