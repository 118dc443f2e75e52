"""The CPU output cache (fused_resnet/cpu_cache.py, csrc/cpu/output_cache.cpp):
freed outputs of the CPU ops are reused, the limit holds, the profiler sees
cached outputs as allocated while they live, and the tensors behave as
at::empty's."""

import os
import subprocess
import sys

import pytest
import torch

import fused_resnet
from fused_resnet import dispatch
from fused_resnet.tools.bench.timing import peak_memory_bytes

pytestmark = pytest.mark.skipif(not dispatch.native_loaded(), reason="fused_resnet._C not built")
ops = torch.ops.fused_resnet

# 8 x 64 x 32 x 32 fp32 = 2 MiB: above the cache's 256 KiB floor.
SHAPE = (8, 64, 32, 32)
NBYTES = 8 * 64 * 32 * 32 * 4


@pytest.fixture
def cache():
    """A fresh, empty cache with a roomy limit; restores the old limit."""
    old = fused_resnet.set_cpu_cache_limit(64 << 20)
    fused_resnet.empty_cpu_cache()
    fused_resnet.reset_cpu_cache_counters()
    yield
    fused_resnet.empty_cpu_cache()
    fused_resnet.set_cpu_cache_limit(old)


def _operands():
    torch.manual_seed(0)
    z = torch.randn(SHAPE).to(memory_format=torch.channels_last)
    return z, torch.rand(64) + 0.5, torch.randn(64)


def test_freed_output_is_reused_and_results_stay_exact(cache):
    z, sc, sh = _operands()
    expect = torch.relu(z * sc.view(1, -1, 1, 1) + sh.view(1, -1, 1, 1))
    y, _ = ops.bn_apply(z, sc, sh, None, True)
    first_ptr = y.data_ptr()
    torch.testing.assert_close(y, expect)
    del y
    stats = fused_resnet.cpu_cache_stats()
    assert stats["cached_bytes"] >= NBYTES and stats["cached_blocks"] >= 1
    y2, _ = ops.bn_apply(z, sc * 2, sh, None, True)
    assert y2.data_ptr() == first_ptr  # the same block, handed out again
    assert fused_resnet.cpu_cache_stats()["hits"] >= 1
    # A recycled block holds the old values until the kernel overwrites all of it.
    torch.testing.assert_close(y2, torch.relu(z * (2 * sc).view(1, -1, 1, 1) + sh.view(1, -1, 1, 1)))
    assert y2.is_contiguous(memory_format=torch.channels_last)


def test_the_block_freed_last_is_handed_out_first(cache):
    """Among cached blocks of one size, the most recently freed one (the one
    most likely still in the CPU caches) serves the next request."""
    z, sc, sh = _operands()
    first, _ = ops.bn_apply(z, sc, sh, None, False)
    second, _ = ops.bn_apply(z, sc, sh, None, False)
    older, newer = first.data_ptr(), second.data_ptr()
    assert older != newer
    del first
    del second  # freed last
    again, _ = ops.bn_apply(z, sc, sh, None, False)
    assert again.data_ptr() == newer
    then, _ = ops.bn_apply(z, sc, sh, None, False)
    assert then.data_ptr() == older


def test_backward_outputs_come_from_the_cache_too(cache):
    z, sc, sh = _operands()
    y, mask = ops.bn_apply(z, sc, sh, None, True)
    mean, var = ops.bn_stats(z)
    invstd = (var + 1e-5).rsqrt()
    dy = torch.randn_like(z)
    before = fused_resnet.cpu_cache_stats()
    dz, dres, _, _ = ops.bn_backward(dy, z, mask, mean, invstd, sc, True, True)
    after = fused_resnet.cpu_cache_stats()
    assert after["hits"] + after["misses"] - before["hits"] - before["misses"] == 2  # dz and dres
    del dz, dres
    assert fused_resnet.cpu_cache_stats()["cached_bytes"] >= 2 * NBYTES


def test_limit_bounds_what_is_kept(cache):
    z, sc, sh = _operands()
    fused_resnet.set_cpu_cache_limit(NBYTES + NBYTES // 2)  # room for one output, not two
    a, _ = ops.bn_apply(z, sc, sh, None, False)
    b, _ = ops.bn_apply(z, sc, sh, None, False)
    del a, b
    stats = fused_resnet.cpu_cache_stats()
    assert stats["cached_blocks"] == 1 and stats["evictions"] == 1
    assert stats["cached_bytes"] <= stats["limit"]
    # Lowering the limit releases what no longer fits.
    fused_resnet.set_cpu_cache_limit(0)
    assert fused_resnet.cpu_cache_stats()["cached_bytes"] == 0


def test_limit_zero_turns_the_cache_off(cache):
    fused_resnet.set_cpu_cache_limit(0)
    z, sc, sh = _operands()
    y, _ = ops.bn_apply(z, sc, sh, None, True)
    del y
    stats = fused_resnet.cpu_cache_stats()
    assert stats["hits"] == stats["misses"] == 0 and stats["cached_bytes"] == 0


def test_small_outputs_bypass_the_cache(cache):
    z = torch.randn(2, 8, 4, 4)
    y, _ = ops.bn_apply(z, torch.ones(8), torch.zeros(8), None, True)
    del y
    assert fused_resnet.cpu_cache_stats()["misses"] == 0


def test_profiler_counts_a_cached_output_while_it_lives(cache):
    z, sc, sh = _operands()
    y, _ = ops.bn_apply(z, sc, sh, None, False)
    del y  # the block now waits in the cache

    def call():
        out, _ = ops.bn_apply(z, sc, sh, None, False)
        return out.sum()

    peak = peak_memory_bytes(call, "cpu")
    assert fused_resnet.cpu_cache_stats()["hits"] >= 1
    assert peak is not None and peak >= NBYTES


def test_cached_output_storage_is_resizable_and_survives_empty_cache(cache):
    z, sc, sh = _operands()
    y, _ = ops.bn_apply(z, sc, sh, None, False)
    keep = y.clone()
    fused_resnet.empty_cpu_cache()  # releases only free blocks, never y's
    torch.testing.assert_close(y, keep)
    y.resize_(2 * y.numel())  # at::empty semantics: resizable storage, old bytes kept
    assert y.numel() == 2 * keep.numel()
    in_memory_order = keep.permute(0, 2, 3, 1).reshape(-1)  # keep is channels_last
    torch.testing.assert_close(y[: keep.numel()], in_memory_order)


def test_set_limit_rejects_bad_values():
    for bad in (-1, 1.5, "1", True):
        with pytest.raises(ValueError, match="limit_bytes"):
            fused_resnet.set_cpu_cache_limit(bad)


@pytest.mark.parametrize("text,limit_mib", [("3", 3), ("lots", 256)])
def test_the_environment_limit_applies_at_import_and_a_bad_one_is_named(text, limit_mib):
    code = ("import torch, fused_resnet\n"
            "print(fused_resnet.cpu_cache_stats()['limit'] >> 20)\n")
    env = dict(os.environ, FUSED_RESNET_CPU_CACHE_MB=text)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == str(limit_mib)
    assert ("ignoring $FUSED_RESNET_CPU_CACHE_MB='lots'" in proc.stderr) == (text == "lots"), proc.stderr
