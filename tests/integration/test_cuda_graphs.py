"""CUDA graphs over the fused path (GPU only; skipped without one): the
inference step and a whole training step (forward, backward, optimizer)
capture with torch.cuda.graph after warm-up on a side stream (which also runs
any autotuning), and replays match the uncaptured model."""

import copy

import pytest
import torch

from helpers import make_trio

pytestmark = pytest.mark.cuda


def _warm_up(fn, n=3):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(s)


def test_inference_captures_and_replays():
    fused, _, _ = make_trio("resnet18", device="cuda")
    fused.eval()
    static_x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        _warm_up(lambda: fused(static_x))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = fused(static_x)
        for _ in range(2):
            x = torch.randn(4, 3, 32, 32, device="cuda")
            static_x.copy_(x)
            graph.replay()
            torch.testing.assert_close(static_y, fused(x), rtol=1e-5, atol=1e-5)


def test_training_step_captures_and_replays():
    fused, _, _ = make_trio("resnet18", device="cuda")
    twin = copy.deepcopy(fused)
    fused.train(), twin.train()
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (fused, twin)]
    # 64x64: layer4's training BatchNorms see 16 values per channel, so
    # reordered cuDNN arithmetic between the two models is not amplified.
    static_x = torch.randn(4, 3, 64, 64, device="cuda")
    static_g = torch.randn(4, 10, device="cuda")

    def step(model, opt, x, g):
        opt.zero_grad(set_to_none=False)
        model(x).backward(g)
        opt.step()

    # Warm-up steps run on both models so their states stay identical.
    _warm_up(lambda: step(fused, opts[0], static_x, static_g), n=3)
    for _ in range(3):
        step(twin, opts[1], static_x, static_g)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(fused, opts[0], static_x, static_g)
    for _ in range(2):
        x, g = torch.randn(4, 3, 64, 64, device="cuda"), torch.randn(4, 10, device="cuda")
        static_x.copy_(x), static_g.copy_(g)
        graph.replay()
        step(twin, opts[1], x, g)
    torch.cuda.synchronize()
    for (name, a), (_, b) in zip(fused.state_dict().items(), twin.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"after replays: {name}")


def test_make_graphed_callables_block():
    fused, _, _ = make_trio("resnet18", device="cuda")
    block = fused.layer2.train()
    x = torch.randn(4, 64, 8, 8, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(block, (x,))
    y = graphed(x)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
