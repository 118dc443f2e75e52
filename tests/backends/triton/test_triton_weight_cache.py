"""The Triton launcher's cache of prepared weight layouts holds no weight
alive: a freed model's layouts are released at once, and a new tensor can
never be served another's layout (fused_resnet/triton/launch.py)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

launch = pytest.importorskip("fused_resnet.backends.triton.launch")


@pytest.fixture(autouse=True)
def _empty_cache():
    launch.clear_weight_cache()
    yield
    launch.clear_weight_cache()


def test_a_freed_models_layouts_are_released():
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3), torch.nn.Conv2d(32, 8, 1))
    layouts = [weakref.ref(launch.prepare_weight(m.weight, 1)) for m in model]
    layouts += [weakref.ref(launch.prepare_dgrad_weight(model[0].weight, 1))]
    assert launch.weight_cache_size() == 3
    assert all(r() is not None for r in layouts), "the cache keeps the layouts of live weights"
    weights = [weakref.ref(m.weight) for m in model]
    del model
    gc.collect()
    assert all(r() is None for r in weights), "the cache must not keep a weight alive"
    assert all(r() is None for r in layouts), "a dead weight's layouts must be released"
    assert launch.weight_cache_size() == 0


def test_the_same_weight_hits_and_an_update_misses():
    w = torch.randn(8, 4, 3, 3)
    first = launch.prepare_weight(w, 1)
    assert launch.prepare_weight(w, 1) is first
    with torch.no_grad():
        w.mul_(2.0)  # bumps the version counter, as an optimizer step does
    again = launch.prepare_weight(w, 1)
    assert again is not first
    torch.testing.assert_close(again, 2.0 * first)


def test_a_tensor_reusing_a_dead_ones_id_gets_its_own_layout():
    seen = {}
    for i in range(200):  # CPython reuses ids of freed objects quickly
        w = torch.full((4, 2, 1, 1), float(i))
        key = id(w)
        prepared = launch.prepare_weight(w, 1)
        assert float(prepared.flatten()[0]) == float(i), f"round {i}: served another tensor's layout"
        seen[key] = seen.get(key, 0) + 1
        del w, prepared
    assert max(seen.values()) > 1, "the test needs an id() to be reused"


def test_the_layout_is_what_the_kernel_expects():
    w = torch.randn(6, 2, 3, 3)
    prepared = launch.prepare_weight(w, 2)  # 2 groups of 3 output channels
    assert prepared.shape == (2, 3 * 3 * 2, 3)
    torch.testing.assert_close(prepared[1, :, 0], w[3].permute(1, 2, 0).reshape(-1))
