"""The CUDA BatchNorm kernels' own code paths against reference.py (GPU only).

tests/ops/test_bn_ops.py checks the ops on every device; this file aims at the
CUDA kernels' internal branches: channels_last rows with C % vector == 0 or
not, NCHW planes with H*W % 8 == 0 or not, a partial last mask byte,
misaligned (offset) storage, mixed dtypes, run-to-run determinism and
CUDA-graph capture of the device-side running-stat update.
"""

import pytest
import torch

from fused_resnet import dispatch
from fused_resnet.ops import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not dispatch.has_kernel("bn_apply", "CUDA"), reason="fused_resnet._C built without CUDA"),
]
ops = torch.ops.fused_resnet
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (shape, channels_last): rows with C % 8 == 0 / C odd, planes with H*W % 8 == 0 / odd, 2-D.
LAYOUTS = [((4, 16, 5, 3), True), ((3, 5, 3, 7), True), ((2, 8, 4, 4), False), ((3, 5, 7, 7), False), ((9, 6), False)]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _z(shape, cl, dtype, offset=0):
    n = torch.Size(shape).numel()
    # offset > 0: storage that starts off a 16-byte boundary (scalar path).
    flat = (torch.randn(n + offset, device="cuda") * 3 + 5).to(dtype)[offset:]
    z = flat.view(shape)
    return z.contiguous(memory_format=torch.channels_last) if cl else z


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,cl", LAYOUTS)
@pytest.mark.parametrize("offset", [0, 1])
def test_stats_apply_backward_match_reference(dtype, shape, cl, offset):
    z = _z(shape, cl, dtype, offset)
    C = shape[1]
    mean, var = ops.bn_stats(z)
    rm, rv = reference.bn_stats(z)
    torch.testing.assert_close(mean, rm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, rv, rtol=1e-4, atol=1e-5)

    acc = reference.stat_dtype(dtype)
    scale = torch.randn(C, device="cuda", dtype=acc)
    shift = torch.randn(C, device="cuda", dtype=acc)
    r = torch.randn(shape, device="cuda").to(dtype)
    for residual in (None, r):
        y, mask = ops.bn_apply(z, scale, shift, residual, True)
        ey, emask = reference.bn_apply(z, scale, shift, residual, True)
        # Same rounding points as the reference: bit for bit.
        assert torch.equal(y, ey)
        assert torch.equal(mask, emask)
        assert y.is_contiguous(memory_format=reference.memory_format_of(z))

    invstd = torch.rsqrt(var + 1e-5)
    weight = torch.randn(C, device="cuda", dtype=acc)
    dy = torch.randn(shape, device="cuda").to(dtype)
    for batch_stats in (True, False):
        got = ops.bn_backward(dy, z, mask, mean, invstd, weight, batch_stats, True)
        want = reference.bn_backward(dy, z, mask, mean, invstd, weight, batch_stats, True)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=TOL[dtype], atol=TOL[dtype] * 10)


@pytest.mark.parametrize("z_dtype,other", [(torch.float16, torch.float32), (torch.float32, torch.bfloat16)])
def test_mixed_dtypes(z_dtype, other):
    z = _z((2, 8, 3, 3), True, z_dtype)
    scale, shift = torch.rand(8, device="cuda"), torch.randn(8, device="cuda")
    r = torch.randn(z.shape, device="cuda", dtype=other)
    y, mask = ops.bn_apply(z, scale, shift, r, True, other)
    ey, emask = reference.bn_apply(z, scale, shift, r, True, other)
    assert y.dtype == other and torch.equal(y, ey) and torch.equal(mask, emask)
    dy = torch.randn(z.shape, device="cuda", dtype=other)
    mean, var = ops.bn_stats(z)
    invstd = torch.rsqrt(var + 1e-5)
    got = ops.bn_backward(dy, z, mask, mean, invstd, None, True, True)
    want = reference.bn_backward(dy, z, mask, mean, invstd, None, True, True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-3, atol=2e-3)


def test_large_reduction_is_deterministic_and_stable():
    # Many partial rows and a large mean with a small variance.
    z = (torch.randn(64, 32, 40, 40, device="cuda") * 1e-2 + 1e3).to(memory_format=torch.channels_last)
    a, b = ops.bn_stats(z), ops.bn_stats(z)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    rm, rv = reference.bn_stats(z.double())
    torch.testing.assert_close(a[1].double(), rv, rtol=1e-2, atol=0)  # naive E[x^2]-E[x]^2 is off by >100%
    dy = torch.randn_like(z)
    _, mask = ops.bn_apply(z, torch.ones(32, device="cuda"), -a[0], None, True)
    g1 = ops.bn_backward(dy, z, mask, a[0], torch.rsqrt(a[1] + 1e-5), None, True, False)
    g2 = ops.bn_backward(dy, z, mask, a[0], torch.rsqrt(a[1] + 1e-5), None, True, False)
    assert all(torch.equal(x, y) for x, y in zip(g1, g2))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_finalize_matches_reference_and_replays_in_a_cuda_graph(momentum):
    C = 6
    mean, var = torch.randn(C, device="cuda"), torch.rand(C, device="cuda") + 0.5
    w, b = torch.randn(C, device="cuda"), torch.randn(C, device="cuda")
    state = [torch.zeros(C, device="cuda"), torch.ones(C, device="cuda"), torch.zeros((), dtype=torch.long, device="cuda")]
    ref_state = [t.clone() for t in state]
    stream = torch.cuda.Stream()
    # The side stream must see the state's fill kernels (queued on the current
    # stream) before the warm-up reads it: without this, a warm-up increment
    # could land before the zero fill and be lost (the likely cause of one
    # run on an H100 counting 3 batches instead of 4).
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.bn_finalize(mean, var, 10, w, b, *state, momentum, 1e-5)  # warm-up outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = ops.bn_finalize(mean, var, 10, w, b, *state, momentum, 1e-5)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    for _ in range(4):  # warm-up + 3 replays
        ref = reference.bn_finalize(mean, var, 10, w, b, *ref_state, momentum, 1e-5)
    assert int(state[2]) == 4
    for g, e in zip(list(out) + state, list(ref) + ref_state):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
