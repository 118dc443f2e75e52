"""NaN and Inf reach the outputs of a fused model exactly where they reach
torchvision's: from the input, from a non-finite weight and from a corrupt
BatchNorm statistic inside the network, in eval and in training, on every
backend that runs here (oneDNN's fused ReLU post-op maps NaN to 0, so the
CPU backend must route non-finite values around it)."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import make_trio

import fused_resnet
from fused_resnet import numerics

GPU_BACKENDS = [b for b in ("cuda", "cudnn", "triton") if b in fused_resnet.available_backends()
                and torch.cuda.is_available()]
CASES = [("cpu", "cpu")] + [(b, "cuda") for b in GPU_BACKENDS]


def _input(kind: str, device: str) -> torch.Tensor:
    x = torch.randn(4, 3, 64, 64)
    if kind == "nan":
        x[1, 0, 20, 30] = float("nan")
    elif kind == "inf":
        x[1, 2, 5, 7] = float("inf")
    elif kind == "-inf":
        x[2, 1, 40, 9] = float("-inf")
    return x.to(device)


def _corrupt(model: torch.nn.Module, kind: str) -> None:
    with torch.no_grad():
        if kind == "nan-weight":
            model.layer2[0].conv1.weight[3, 5, 0, 0] = float("nan")
        elif kind == "inf-weight":
            model.layer3[1].conv2.weight[0, 0, 1, 1] = float("inf")
        elif kind == "negative-running-var":  # a corrupt checkpoint: sqrt of a negative variance
            model.layer1[1].bn1.running_var[7] = -4.0


def _same_non_finite(yf: torch.Tensor, ye: torch.Tensor, what: str) -> None:
    yf, ye = yf.detach().cpu(), ye.detach().cpu()
    assert torch.equal(torch.isnan(yf), torch.isnan(ye)), (
        f"{what}: NaN at {int(torch.isnan(yf).sum())} places, eager {int(torch.isnan(ye).sum())}")
    assert torch.equal(torch.isposinf(yf), torch.isposinf(ye)), f"{what}: +Inf pattern differs from eager"
    assert torch.equal(torch.isneginf(yf), torch.isneginf(ye)), f"{what}: -Inf pattern differs from eager"


def _pair(backend: str, device: str, corruption: str | None = None):
    fused, eager, ref = make_trio("resnet18", device)
    fused.set_backend(backend)
    for m in (fused, eager, ref):
        _corrupt(m, corruption)
    return fused, eager, ref


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("kind", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_non_finite_input_in_eval(backend, device, kind, channels_last):
    fused, eager, ref = _pair(backend, device)
    x = _input(kind, device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        fused.to(memory_format=torch.channels_last)
    with torch.no_grad():
        yf, ye, yr = fused.eval()(x), eager.eval()(x), ref.eval()(x.cpu().double())
    _same_non_finite(yf, ye, f"{backend} eval, {kind} input")
    assert not torch.isfinite(ye).all(), "the case must reach the logits"
    # The images without a non-finite pixel keep eager's values.
    clean = torch.isfinite(ye).all(dim=1)
    assert clean.any()
    numerics.assert_close_to_reference(yf[clean], ye[clean], yr[clean.cpu()], what=f"{backend} clean images")


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("corruption", ["nan-weight", "inf-weight", "negative-running-var"])
def test_non_finite_inside_the_network_in_eval(backend, device, corruption):
    fused, eager, _ = _pair(backend, device, corruption)
    x = _input("finite", device)
    with torch.no_grad():
        yf, ye = fused.eval()(x), eager.eval()(x)
    assert not torch.isfinite(ye).all(), "the corruption must reach the logits"
    _same_non_finite(yf, ye, f"{backend} eval, {corruption}")


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_non_finite_input_in_training(backend, device, kind):
    fused, eager, _ = _pair(backend, device)
    x = _input(kind, device)
    yf, ye = fused.train()(x), eager.train()(x)
    _same_non_finite(yf, ye, f"{backend} train, {kind} input")
    g = torch.randn_like(ye)
    yf.backward(g)
    ye.backward(g)
    for (name, pf), (_, pe) in zip(fused.named_parameters(), eager.named_parameters()):
        _same_non_finite(pf.grad, pe.grad, f"{backend} train, {kind} input: grad of {name}")
    for (name, bf), (_, be) in zip(fused.named_buffers(), eager.named_buffers()):
        _same_non_finite(bf, be, f"{backend} train, {kind} input: buffer {name}")


def test_a_single_nan_pixel_poisons_only_its_image():
    """The issue's report: one NaN pixel in image 1 of 2, eval mode."""
    fused, eager, _ = _pair("cpu", "cpu")
    x = torch.randn(2, 3, 64, 64)
    x[1, 0, 10, 10] = float("nan")
    with torch.no_grad():
        yf, ye = fused.eval()(x), eager.eval()(x)
    assert torch.isnan(ye[1]).all() and torch.isfinite(ye[0]).all()
    _same_non_finite(yf, ye, "one NaN pixel")


def test_converted_timm_model_propagates_nan():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    eager = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    fused = fused_resnet.convert(copy.deepcopy(eager))
    x = _input("nan", "cpu")
    with torch.no_grad():
        _same_non_finite(fused(x), eager(x), "timm resnet18")


def test_finite_inputs_keep_the_fused_relu():
    """The guard routes only non-finite (or astronomically large) values
    around oneDNN's ReLU post-op: a finite forward runs fused throughout."""
    if "cpu" not in fused_resnet.available_backends():
        pytest.skip("no native CPU kernels built")
    from fused_resnet import _compat

    calls = []
    real = _compat.mkldnn_conv

    def spy(x, w, b, padding, stride, dilation, groups, unary):
        calls.append(unary)
        return real(x, w, b, padding, stride, dilation, groups, unary)

    fused, _, _ = _pair("cpu", "cpu")
    x = _input("finite", "cpu")
    try:
        _compat.mkldnn_conv = spy
        with torch.no_grad():
            fused.eval()(x)
            finite_calls = list(calls)
            calls.clear()
            fused(_input("nan", "cpu"))
    finally:
        _compat.mkldnn_conv = real
    # resnet18: the stem and each block's first conv end in a ReLU without a
    # residual (the downsample convs have none).
    assert finite_calls.count("relu") == 1 + 8
    # A NaN anywhere in a tensor sends every unit it reaches down the exact path.
    assert calls.count("relu") == 0 and calls[0] is None


def test_finite_bounds_bookkeeping():
    from fused_resnet.backends.cpu import finite_bounds as fb

    fb.forget()
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    b = fb.measure(x)
    assert b >= float(x.abs().max()) and b == pytest.approx(float(x.double().square().sum().sqrt()), rel=1e-5)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[1, 2, 3, 4] = bad
        assert fb.measure(y) == float("inf")
    assert fb.measure(torch.full((2, 2, 2, 2), 3e38)) == float("inf")  # the sum overflows: a (safe) false alarm
    # Remembered until the tensor changes in place.
    fb.record(x, 1.0)
    assert fb.of(x) == 1.0
    x.mul_(2.0)
    assert fb.of(x) == pytest.approx(2 * b, rel=1e-5)
    # A max pool carries its input's bound; an unknown input carries nothing.
    pooled = torch.nn.functional.max_pool2d(x, 2)
    fb.carry(x, pooled)
    assert fb.of(pooled) == fb.of(x)
    # A loose remembered bound is measured afresh before it blocks the fusion.
    fb.record(x, 1e36)
    assert fb.pre_activation(x, None, 100.0, 0.0) < fb.NO_OVERFLOW
    assert fb.pre_activation(x, None, float("inf"), 0.0) == float("inf")
    # Bounds never keep a tensor alive.
    import gc
    import weakref

    ref = weakref.ref(x)
    del x, pooled
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_a_nan_written_in_place_between_blocks_propagates(mode):
    """A forward hook that writes a NaN into a block's output in place: the
    next block must not trust a bound remembered for that tensor."""
    fused, eager, _ = _pair("cpu", "cpu")

    def poison(module, inputs, output):
        output[0, 0, 0, 0] = float("nan")

    for m in (fused, eager):
        m.eval().layer2[0].register_forward_hook(poison)
    x = _input("finite", "cpu")
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        yf, ye = fused(x), eager(x)
    assert torch.isnan(ye[0]).all()
    _same_non_finite(yf, ye, f"NaN written by a hook ({mode})")
