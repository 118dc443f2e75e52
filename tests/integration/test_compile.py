"""torch.compile over fused models: one graph (fullgraph=True, no break) in
train and eval, and the compiled model's outputs, gradients and running
statistics match eager's (numerics criterion). Compile time dominates on a
small CPU machine, so each test compiles resnet18 once at 2x3x32x32."""

import pytest
import torch

from helpers import compare_step, make_trio

import fused_resnet

CPU_BACKEND = "cpu" if "cpu" in fused_resnet.available_backends() else "reference"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_no_graph_break(train):
    fused, _, _ = make_trio("resnet18")
    fused.train(train)
    explanation = torch._dynamo.explain(fused)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _graph_ops(model, x):
    """Names of every op in the graphs dynamo captures for model(x)."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch.compile(model, backend=backend, fullgraph=True)(x)
    return seen


def test_fused_path_is_traced_not_bypassed():
    # The training graph must hold our ops, not eager BatchNorm.
    fused, _, _ = make_trio("resnet18")
    fused.train()
    names = " ".join(_graph_ops(fused, torch.randn(2, 3, 32, 32)))
    if CPU_BACKEND == "cpu":
        assert "batch_norm_act" in names, names
    assert "batch_norm" not in names.replace("batch_norm_act", ""), names


def test_aot_trace_runs_the_same_kernels():
    # aot_eager runs the traced, functionalised forward and backward graphs
    # op for op: with our fake kernels, autograd formula and the in-place
    # running-stat update right, it reproduces the uncompiled fused model.
    fused, _, _ = make_trio("resnet18")
    twin, _, _ = make_trio("resnet18")
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    for step in range(2):  # the second step reuses the graph with updated buffers
        x = torch.randn(2, 3, 32, 32)
        g = torch.randn(2, 10)
        fused(x).backward(g)
        compiled(x).backward(g)
        for (name, a), (_, b) in zip(fused.named_parameters(), twin.named_parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=f"step {step}: grad {name}")
        for (name, a), (_, b) in zip(fused.named_buffers(), twin.named_buffers()):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=f"step {step}: buffer {name}")


def test_inductor_matches_eager_in_training(train=True):
    # Training only: it covers the forward, backward and buffer updates; the
    # eval graph (folded convs) is checked by the trace tests above and
    # test_export.py, and every inductor compile costs ~a minute here.
    # Inductor reorders float arithmetic, in torchvision's model as in ours:
    # the baseline error is that of torchvision compiled the same way.
    fused, eager, ref = make_trio("resnet18")
    compiled = torch.compile(fused, fullgraph=True)
    compiled_eager = torch.compile(eager)
    compare_step(compiled, compiled_eager, ref, torch.randn(4, 3, 64, 64), train=train,
                 what=f"inductor resnet18 ({'train' if train else 'eval'})", backward=train)


@pytest.mark.cuda
def test_compiled_cuda_reduce_overhead():
    fused, eager, ref = make_trio("resnet18", device="cuda")
    compiled = torch.compile(fused, mode="reduce-overhead", fullgraph=True)
    for step in range(3):  # warm-up, record, replay
        for m in (compiled, eager, ref):
            m.zero_grad()
        # 64x64, not 32x32: at 32x32 layer4's activations are 1x1, where
        # torch 2.11's inductor predicts a channels_last grad_weight for
        # cuDNN's convolution_backward but gets a contiguous one and fails its
        # stride assertion (seen on an H100; an upstream fake-kernel problem,
        # pytorch/pytorch#175969 and #197517, not one of our ops).
        x = torch.randn(4, 3, 64, 64, device="cuda")
        compare_step(compiled, eager, ref, x, train=True, what=f"reduce-overhead step {step}")
