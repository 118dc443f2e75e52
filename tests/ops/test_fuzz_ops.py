"""Property tests (issue 7, item 1) of the fused ops on the CPU backend
against an fp64 eager reference, under fused_resnet.numerics.

Shapes include N=1, C=1/odd/not a multiple of 8, H/W of 1 and odd; layouts
include channels_last, non-contiguous slices and zero-stride expanded views,
mixed between z and the residual. Failures found once are replayed from the
database tests/.hypothesis-db; CI runs a fixed set (helpers.fuzz_settings).
FUSED_RESNET_FUZZ_EXAMPLES=<n> runs n examples per test instead of the small
default (`make fuzz`: many).
"""

from __future__ import annotations

import os

import torch
from hypothesis import example, given
from hypothesis import strategies as st

from fused_resnet import numerics
from fused_resnet.ops import add_relu, batch_norm_act, bn_apply, bn_stats
from helpers import MIN_BN_VALUES, fuzz_settings

EXAMPLES = int(os.environ.get("FUSED_RESNET_FUZZ_EXAMPLES", "25"))
FUZZ = fuzz_settings("fused_resnet_fuzz", EXAMPLES)

# CPU kernels take all four; fp16/bf16 eager BN on CPU is the comparison.
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "sliced", "expanded"]

dims = st.tuples(
    st.sampled_from([1, 2, 3]),  # N
    st.sampled_from([1, 3, 5, 8, 13]),  # C
    st.sampled_from([1, 2, 3, 5]),  # H
    st.sampled_from([1, 4, 5]),  # W
)


def make(shape, dtype, layout, gen):
    """A tensor of `shape` with the given memory layout (values fixed by gen)."""
    n, c, h, w = shape
    if layout == "sliced":  # every other column of a wider tensor: non-contiguous
        return torch.randn(n, c, h, 2 * w, generator=gen, dtype=torch.float64)[..., ::2].to(dtype)
    if layout == "expanded":  # zero stride along N
        return torch.randn(1, c, h, w, generator=gen, dtype=torch.float64).to(dtype).expand(n, c, h, w)
    t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def _check(fused, eager, ref, dtype, kind, what, tie_channels=0):
    """The numerics criterion; `tie_channels` channels (dim 1 of an NCHW
    tensor, dim 0 of a per-channel vector) may exceed it: those holding a
    ReLU tie (see _relu_tie_channels)."""
    assert fused.shape == ref.shape, f"{what}: shape {tuple(fused.shape)} vs {tuple(ref.shape)}"
    if tie_channels and fused.dim() == 4:
        fused, eager, ref = (t.transpose(0, 1) for t in (fused, eager, ref))
    numerics.assert_close_to_reference(fused, eager, ref, dtype=dtype, kind=kind, what=what,
                                       outlier_channels=tie_channels)


def _relu_tie_channels(bn_out, residual, dtype):
    """How many channels hold a ReLU tie: a pre-activation (fp64 reference)
    closer to zero than the rounding of its terms in `dtype`, where two
    correct computations may take different sides of the ReLU. A flipped
    element moves that channel's BatchNorm gradient sums, so the gradient of
    the whole channel may then differ by O(1) (numerics.compare's
    outlier_channels)."""
    pre = bn_out if residual is None else bn_out + residual
    terms = bn_out.abs() if residual is None else bn_out.abs() + residual.abs()
    band = 4 * torch.finfo(dtype).eps * terms
    return int((pre.abs() <= band).any(dim=(0, 2, 3)).sum())


@FUZZ
@given(dims=dims, dtype=st.sampled_from(DTYPES), lx=st.sampled_from(LAYOUTS), lr=st.sampled_from(LAYOUTS),
       seed=st.integers(0, 2**16))
def test_add_relu(dims, dtype, lx, lr, seed):
    gen = torch.Generator().manual_seed(seed)
    x, r = make(dims, dtype, lx, gen), make(dims, dtype, lr, gen)
    xs = [t.detach().clone().requires_grad_() for t in (x, r)]
    es = [t.detach().clone().requires_grad_() for t in (x, r)]
    rs = [t.detach().double().requires_grad_() for t in (x, r)]
    yf = add_relu(*xs, backend="cpu")
    ye = torch.relu(es[0] + es[1])
    yr = torch.relu(rs[0] + rs[1])
    _check(yf, ye, yr, dtype, "output", "add_relu y")
    g = torch.randn(dims, generator=gen, dtype=torch.float64)
    for y, ins in ((yf, xs), (ye, es), (yr, rs)):
        y.backward(g.to(y.dtype))
    for i in range(2):
        _check(xs[i].grad, es[i].grad, rs[i].grad, dtype, "grad", f"add_relu grad {i}")


@FUZZ
@given(dims=dims, dtype=st.sampled_from(DTYPES), lz=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16))
def test_bn_stats(dims, dtype, lz, seed):
    z = make(dims, dtype, lz, torch.Generator().manual_seed(seed))
    mean, var = bn_stats(z, backend="cpu")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    em, ev = z.to(acc).mean(dim=(0, 2, 3)), z.to(acc).var(dim=(0, 2, 3), correction=0)
    rm, rv = z.double().mean(dim=(0, 2, 3)), z.double().var(dim=(0, 2, 3), correction=0)
    _check(mean, em, rm, acc, "output", "bn_stats mean")
    _check(var, ev, rv, acc, "output", "bn_stats var")


@FUZZ
@given(dims=dims, dtype=st.sampled_from(DTYPES), lz=st.sampled_from(LAYOUTS), lr=st.sampled_from(LAYOUTS),
       residual=st.booleans(), relu=st.booleans(), seed=st.integers(0, 2**16))
def test_bn_apply(dims, dtype, lz, lr, residual, relu, seed):
    gen = torch.Generator().manual_seed(seed)
    z = make(dims, dtype, lz, gen)
    r = make(dims, dtype, lr, gen) if residual else None
    c = dims[1]
    scale = torch.rand(c, generator=gen) + 0.5
    shift = torch.randn(c, generator=gen)
    y, mask = bn_apply(z, scale, shift, r, relu, backend="cpu")

    def eager(zz, rr, acc):
        out = (zz.to(acc) * scale.to(acc).view(1, -1, 1, 1) + shift.to(acc).view(1, -1, 1, 1)).to(zz.dtype)
        if rr is not None:
            out = out + rr
        return torch.relu(out) if relu else out

    ye = eager(z, r, torch.float64 if dtype == torch.float64 else torch.float32)
    yr = eager(z.double(), None if r is None else r.double(), torch.float64)
    _check(y, ye, yr, dtype, "output", "bn_apply y")
    if relu:
        assert mask.numel() == (z.numel() + 7) // 8
    else:
        assert mask.numel() == 0


@FUZZ
# An expanded z of one sample of one value: the statistics must still see
# MIN_BN_VALUES distinct values per channel.
@example(dims=(1, 1, 1, 1), dtype=torch.float32, lz="expanded", lr="contiguous", residual=False, relu=False,
         training=False, momentum=0.1, affine=False, track=False, seed=0)
@given(dims=dims, dtype=st.sampled_from(DTYPES), lz=st.sampled_from(LAYOUTS), lr=st.sampled_from(LAYOUTS),
       residual=st.booleans(), relu=st.booleans(), training=st.booleans(),
       momentum=st.sampled_from([0.1, None]), affine=st.booleans(), track=st.booleans(),
       seed=st.integers(0, 2**16))
def test_batch_norm_act(dims, dtype, lz, lr, residual, relu, training, momentum, affine, track, seed):
    n, c, h, w = dims
    # Batch statistics of a few distinct values per channel are
    # ill-conditioned (helpers.MIN_BN_VALUES): with one, the variance is 0
    # and the output is the rounding of z - mean amplified by 1/sqrt(eps).
    # An expanded z repeats one sample along N, so only H*W of its values
    # are distinct: it grows W instead; other layouts grow the batch and keep
    # the drawn H, W and C.
    if training or not track:
        if lz == "expanded" and h * w < MIN_BN_VALUES:
            w = -(-MIN_BN_VALUES // h)
        elif lz != "expanded" and n * h * w < MIN_BN_VALUES:
            n = -(-MIN_BN_VALUES // (h * w))
        dims = (n, c, h, w)
    gen = torch.Generator().manual_seed(seed)
    z = make(dims, dtype, lz, gen)
    r = make(dims, dtype, lr, gen) if residual else None
    g = torch.randn(dims, generator=gen, dtype=torch.float64)

    base = torch.nn.BatchNorm2d(c, momentum=momentum, affine=affine, track_running_stats=track)
    with torch.no_grad():
        if affine:
            base.weight.uniform_(0.5, 1.5, generator=gen)
            base.bias.uniform_(-0.5, 0.5, generator=gen)
        if track:
            base.running_mean.uniform_(-0.5, 0.5, generator=gen)
            base.running_var.uniform_(0.5, 2.0, generator=gen)
            base.num_batches_tracked.fill_(3)
    # Eager in the low precision runs BN in fp32 parameters (as autocast
    # keeps them), the input in `dtype`; the reference is all fp64.
    bns = {k: _copy_bn(base, torch.float64 if (k == "ref" or dtype == torch.float64) else torch.float32)
           for k in ("fused", "eager", "ref")}
    for m in bns.values():
        m.train(training)

    def run(key, zz, rr):
        zz = zz.detach().clone().requires_grad_()
        rr = None if rr is None else rr.detach().clone().requires_grad_()
        bn = bns[key]
        if key == "fused":
            y = batch_norm_act(zz, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                               training=bn.training, momentum=bn.momentum, eps=bn.eps, residual=rr, relu=relu,
                               backend="cpu")
        else:
            y = bn(zz).to(zz.dtype)
            if rr is not None:
                y = y + rr
            if relu:
                y = torch.relu(y)
        y.backward(g.to(y.dtype))
        return y, zz, rr, bn

    out = {"fused": run("fused", z, r), "eager": run("eager", z, r),
           "ref": run("ref", z.double(), None if r is None else r.double())}
    (yf, zf, rf, bf), (ye, ze, re, be), (yr, zr, rr_, br) = out["fused"], out["eager"], out["ref"]
    _check(yf, ye, yr, dtype, "output", "batch_norm_act y")
    ties = 0
    if relu:
        probe = _copy_bn(base, torch.float64).train(training)  # base's state: before any update
        with torch.no_grad():
            ties = _relu_tie_channels(probe(z.double()), None if r is None else r.double(), dtype)
    _check(zf.grad, ze.grad, zr.grad, dtype, "grad", "grad z", ties)
    if residual:
        _check(rf.grad, re.grad, rr_.grad, dtype, "grad", "grad residual", ties)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    if affine:
        _check(bf.weight.grad, be.weight.grad, br.weight.grad, pdt, "grad", "grad weight", ties)
        _check(bf.bias.grad, be.bias.grad, br.bias.grad, pdt, "grad", "grad bias", ties)
    if track:
        _check(bf.running_mean, be.running_mean, br.running_mean, pdt, "output", "running_mean")
        _check(bf.running_var, be.running_var, br.running_var, pdt, "output", "running_var")
        assert torch.equal(bf.num_batches_tracked, be.num_batches_tracked)


def _copy_bn(bn, dtype):
    m = torch.nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                             track_running_stats=bn.track_running_stats)
    m.load_state_dict(bn.state_dict())
    return m.to(dtype)
