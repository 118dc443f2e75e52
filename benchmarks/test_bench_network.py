"""Network level: resnet18 / resnet50 inference (eval, no_grad) and training
step (forward + cross-entropy + backward + SGD), torchvision eager (NCHW) vs
each fused backend (channels_last), built exactly as `fused-resnet bench`
builds them (fused_resnet.tools.bench.providers), from the same weights.

extra_info: images/s. Before timing, each provider's first-step logits are
checked against the high-precision reference (fp64 on CPU, fp32 without
TF32 on GPU) with the numerics criterion.
"""

from __future__ import annotations

import os

import pytest

from fused_resnet.tools.bench import providers as prov

from bench_settings import BATCH, DEVICE, ON_GPU  # benchmarks/ is on sys.path under pytest

IMAGE = 224 if ON_GPU else int(os.environ.get("FUSED_RESNET_BENCH_IMAGE", "224"))
PROVIDERS = [pytest.param("eager", id="eager")] + [
    pytest.param(f"fused-{p.values[0]}", id=p.id, marks=p.marks) for p in prov.fused_backend_params(DEVICE)
]

_cache: dict = {}


def _weights_and_input(model, device, dtype):
    key = (model, str(device), dtype)
    if key not in _cache:
        _cache.clear()  # one model's tensors at a time
        sd = prov.reference_state_dict(model, seed=0)
        x, y = prov.make_input(BATCH, IMAGE, device, dtype, seed=1)
        _cache[key] = {"sd": sd, "x": x, "y": y, "ref": {}, "eager": {}}
    return _cache[key]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["inference", "train"])
@pytest.mark.parametrize("model", ["resnet18", "resnet50"])
def test_network(benchmark, timed, check, device, dtype, model, mode, provider):
    c = _weights_and_input(model, device, dtype)
    sd, x, y = c["sd"], c["x"], c["y"]
    if mode not in c["ref"]:
        c["ref"][mode] = prov.reference_logits(model, sd, x, mode)
        eager_p = prov.make_provider("eager", device, dtype)
        c["eager"][mode] = prov.make_step(eager_p, mode, model, sd, x, y, dtype, channels_last=False).call()
    p = prov.make_provider(provider, device, dtype)
    assert p.available, p.reason  # unavailable fused backends are skipped at collection
    step = prov.make_step(p, mode, model, sd, x, y, dtype, channels_last=True)
    out = step.call()  # first step: from the initial weights, so comparable with the reference
    check(out.float(), c["eager"][mode].float(), c["ref"][mode], dtype, what=f"{model} {mode} logits")

    benchmark.group = f"network {model} {mode} batch {BATCH} {IMAGE}x{IMAGE}"
    timed(benchmark, step.call, device, rounds=20 if ON_GPU else 3)
    if benchmark.stats is not None:
        benchmark.extra_info.update(images_per_s=BATCH / benchmark.stats.stats.median, batch=BATCH,
                                    image_size=IMAGE, dtype=str(dtype), device=str(device))
