"""Large tensors (issue 7, item 3): index arithmetic is 64-bit wherever a
tensor can pass 2**31 elements.

- Fast tests (always run): the 64-bit scalar arguments of the ops (`count`,
  `num_batches_tracked`) beyond 2**31 and 2**32 on tiny tensors; the ops'
  fake kernels (torch.compile's shape propagation) on tensors of 2**31 + 4096
  elements; and the mask-window reader the big tests use, checked against
  reference.pack_mask and the C++ kernel (bit i % 8 of byte i // 8, memory order).
- Big tests (`slow`): add_relu, bn_apply -> bn_backward and bn_stats of the CPU
  kernels on fp16/bf16 tensors of 2**31 + 4096 elements, contiguous and
  channels_last. Values are random in a few windows of memory (the start,
  around element 2**31, the end) and a known constant elsewhere; outputs are
  checked in the windows against the reference formula evaluated on the
  windows only, reductions against their closed form. They need about 12 GiB
  of free memory and take about 25-40 s each here (first-touch page faults of
  4 GiB buffers dominate), so they run only with FUSED_RESNET_SLOW=1.
  On a GPU the same checks run for the CUDA kernels and the Triton conv
  (FUSED_RESNET_SLOW is not needed there: they take seconds).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from fused_resnet import numerics, ops
from fused_resnet.ops import reference

BIG = 2**31 + 4096
# (N, C, H, W) with N * C * H * W == BIG and a small C.
SHAPE_C3 = (2, 3, 174763, 2048)
SHAPE_C1 = (2, 1, 524289, 2048)  # one channel: more than 2**31 values per channel
GIB = 1 << 30
SLOW_ENABLED = os.environ.get("FUSED_RESNET_SLOW", "0") == "1"
HAS_CUDA = torch.cuda.is_available()

# Windows of memory order [start, stop), multiples of 8 (whole mask bytes):
# the start, across element 2**31 (int32 overflow), and the end.
WINDOWS = [(0, 4096), (2**31 - 4096, 2**31 + 1024), (BIG - 1024, BIG)]
# Elements between the windows (constant "bulk"), probed directly: after the
# first window, mid-tensor, just below the middle window, past 2**31 between
# the last two windows, and just before the last one.
BULK_PROBES = [4096 + 9, 2**30 + 3, 2**31 - 4097, 2**31 + 1024 + 5, BIG - 1025]

assert SHAPE_C3[0] * SHAPE_C3[1] * SHAPE_C3[2] * SHAPE_C3[3] == BIG
assert SHAPE_C1[0] * SHAPE_C1[1] * SHAPE_C1[2] * SHAPE_C1[3] == BIG


# ------------------------------------------------------------------ helpers


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def need_memory(device: str, nbytes: int) -> None:
    """Skip unless `nbytes` (plus headroom) are free on the device."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        if free < nbytes + GIB:
            pytest.skip(f"needs {(nbytes + GIB) / GIB:.1f} GiB of free GPU memory, {free / GIB:.1f} free")
        return
    want = max(16 * GIB, nbytes + 3 * GIB)
    have = mem_available()
    if have < want:
        pytest.skip(f"needs {want / GIB:.0f} GiB of available memory, {have / GIB:.1f} GiB available")


def flat(t: torch.Tensor) -> torch.Tensor:
    """t's elements in memory order, as a view (t contiguous or channels_last)."""
    if reference.memory_format_of(t) == torch.channels_last:
        return t.permute(0, 2, 3, 1).view(-1)  # view: raises rather than copies
    return t.view(-1)


def channel_of(idx: torch.Tensor, shape, fmt) -> torch.Tensor:
    """Channel of each memory-order index of a tensor of `shape` in `fmt`."""
    n, c, h, w = shape
    if fmt == torch.channels_last:
        return idx % c
    return (idx // (h * w)) % c


def mask_bits(mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Bits [start, stop) of a packed mask (bit i % 8 of byte i // 8), as bool.
    start is a multiple of 8; only the bytes of the window are read."""
    assert start % 8 == 0
    nbytes = (stop - start + 7) // 8
    b = mask[start // 8: start // 8 + nbytes].cpu()
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((b.view(-1, 1) >> shifts) & 1).reshape(-1)[: stop - start].bool()


def big_tensor(shape, dtype, fmt, device, bulk, windows, gen, scale=1.0):
    """A tensor whose memory holds `bulk` (a constant, or a (value_even,
    value_odd) pair alternating in memory order) except in `windows`, which
    hold random values * scale. Returns (tensor, {window: fp64 values})."""
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)
    f = flat(t)
    if isinstance(bulk, tuple):
        f[0::2].fill_(bulk[0])
        f[1::2].fill_(bulk[1])
    else:
        f.fill_(bulk)
    vals = {}
    for s, e in windows:
        v = (torch.randn(e - s, generator=gen, dtype=torch.float64) * scale).to(dtype)
        f[s:e].copy_(v.to(device))
        vals[(s, e)] = v.double()
    return t, vals


def _slow_cpu():
    if not SLOW_ENABLED:
        pytest.skip("tensors of 2**31 + 4096 elements: ~12 GiB and 25-40 s each; set FUSED_RESNET_SLOW=1")


def _device_params():
    return [pytest.param("cpu", id="cpu"),
            pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"))]


def _gate(device):
    if device == "cpu":
        _slow_cpu()


def _backend(device):
    return "cpu" if device == "cpu" else "cuda"


# --------------------------------------------------------------- fast tests


@pytest.mark.parametrize("count", [2**31 - 1, 2**31, BIG, 2**32 + 5, 2**40 + 3])
def test_bn_finalize_count_is_64_bit(count):
    """count (values per channel) beyond int32 and uint32: the unbiased
    running variance uses count / (count - 1) exactly (fp64 statistics make
    a truncated count visible: 2**32 + 5 read as 32 bits is 5)."""
    g = torch.Generator().manual_seed(0)
    c = 5
    mean = torch.randn(c, generator=g, dtype=torch.float64)
    var = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    weight = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(c, generator=g, dtype=torch.float64)
    run = {k: (torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64),
               torch.tensor(3, dtype=torch.long)) for k in ("fused", "ref")}
    out_f = ops.bn_finalize(mean, var, count, weight, bias, *run["fused"], 1.0, 1e-5, backend="cpu")
    out_r = reference.bn_finalize(mean, var, count, weight, bias, *run["ref"], 1.0, 1e-5)
    for a, b in zip(out_f, out_r):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    # momentum=1: running_var is exactly the unbiased batch variance.
    torch.testing.assert_close(run["fused"][1], var * (count / (count - 1)), rtol=1e-15, atol=0)
    torch.testing.assert_close(run["fused"][0], mean, rtol=0, atol=0)
    assert run["fused"][1].ne(var).all()  # the correction is visible in fp64


@pytest.mark.parametrize("tracked", [2**31 - 2, 2**31 + 7, 2**32 + 11])
def test_bn_finalize_cumulative_average_with_64_bit_counter(tracked):
    """momentum=None: factor 1 / num_batches_tracked, a counter beyond 2**31."""
    g = torch.Generator().manual_seed(1)
    c = 4
    mean = torch.randn(c, generator=g, dtype=torch.float64) * 1e6
    var = torch.rand(c, generator=g, dtype=torch.float64) * 1e6
    state = {k: (torch.randn(c, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
                 torch.rand(c, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 1,
                 torch.tensor(tracked, dtype=torch.long)) for k in ("fused", "ref")}
    ops.bn_finalize(mean, var, 10, None, None, *state["fused"], None, 1e-5, backend="cpu")
    reference.bn_finalize(mean, var, 10, None, None, *state["ref"], None, 1e-5)
    assert int(state["fused"][2]) == tracked + 1
    for a, b in zip(state["fused"][:2], state["ref"][:2]):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0)
    before = torch.randn(c, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert not torch.equal(state["fused"][0], before)  # the tiny update did happen


def test_fake_kernels_beyond_int32():
    """Shapes from the ops' fake kernels (what torch.compile and export
    propagate) for 2**31 + 4096 elements: masks of ceil(numel / 8) bytes,
    outputs of the input's shape and memory format."""
    z = torch.empty(SHAPE_C3, dtype=torch.float16, device="meta")
    zcl = torch.empty(SHAPE_C3, dtype=torch.float16, device="meta", memory_format=torch.channels_last)
    sc = torch.ones(3, device="meta")
    assert z.numel() == BIG
    for t in (z, zcl):
        y, mask = torch.ops.fused_resnet.bn_apply(t, sc, sc, None, True, None)
        assert y.shape == t.shape and mask.shape == ((BIG + 7) // 8,)
        assert reference.memory_format_of(y) == reference.memory_format_of(t)
        y2, mask2 = torch.ops.fused_resnet.bn_apply(t, sc, sc, t, False, torch.float32)
        assert y2.dtype == torch.float32 and mask2.numel() == 0
        assert torch.ops.fused_resnet.add_relu(t, t).shape == t.shape
        mean, var = torch.ops.fused_resnet.bn_stats(t)
        assert mean.shape == var.shape == (3,) and mean.dtype == torch.float32
        dz, dres, dw, db = torch.ops.fused_resnet.bn_backward(t, t, mask, sc, sc, sc, True, True)
        assert dz.shape == dres.shape == t.shape and dw.shape == db.shape == (3,)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 5, 3, 3), (3, 13, 9, 41)])
def test_mask_window_reader(shape, fmt):
    """mask_bits (the reader the big tests trust) agrees with
    reference.unpack_mask and with the C++ kernel's mask, on windows that
    start at any byte, including ones spanning the kernels' 4096-element chunks."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
    c = shape[1]
    scale, shift = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.3
    y, mask = ops.bn_apply(z, scale, shift, None, True, backend="cpu")
    yr, mask_r = reference.bn_apply(z, scale, shift, None, True)
    assert torch.equal(mask, mask_r)
    pos = flat(y) > 0
    n = y.numel()
    starts = {0, 8, (n // 16) * 8, ((n - 1) // 8) * 8} | ({4096 - 8, 4096} if n > 4096 else set())
    for s in sorted(starts):
        for e in (min(n, s + 1), min(n, s + 13), n):
            if e <= s:
                continue
            assert torch.equal(mask_bits(mask, s, e), pos[s:e]), (s, e)
    # ... and the element -> bit rule: element i is bit i % 8 of byte i // 8.
    unpacked = reference.unpack_mask(mask, y)
    assert torch.equal(flat(unpacked.contiguous(memory_format=fmt)), pos)
    i = n - 1
    assert bool((int(mask[i // 8]) >> (i % 8)) & 1) == bool(pos[i])
    # The channel map used by the big tests matches the memory layout.
    idx = torch.arange(n)
    ch = channel_of(idx, shape, reference.memory_format_of(z))
    expect = torch.arange(c).view(1, c, 1, 1).expand(shape).contiguous(memory_format=fmt)
    assert torch.equal(ch, flat(expect))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["planes", "rows"])
def test_bn_stats_accuracy_at_large_counts(fmt):
    """Batch statistics over 2**24 values per channel (e.g. batch 64 at
    512x512) under the numerics criterion, fp32 eager as the yardstick."""
    g = torch.Generator().manual_seed(5)
    z = (torch.randn(4, 2, 2048, 2048, generator=g) * 0.75 + 0.1).half()
    z[0, :, 0, 0] = 40.0  # an outlier where each channel starts
    z = z.contiguous(memory_format=fmt)
    mean, var = ops.bn_stats(z, backend="cpu")
    ev, em = torch.var_mean(z.float(), dim=(0, 2, 3), correction=0)
    rv, rm = torch.var_mean(z.double(), dim=(0, 2, 3), correction=0)
    numerics.assert_close_to_reference(mean, em, rm, dtype=torch.float32, what="bn_stats mean")
    numerics.assert_close_to_reference(var, ev, rv, dtype=torch.float32, what="bn_stats var")


# ---------------------------------------------------------------- big tests


@pytest.mark.slow
@pytest.mark.parametrize("device", _device_params())
@pytest.mark.parametrize("dtype", [torch.float16])
def test_add_relu_beyond_int32(device, dtype):
    _gate(device)
    esize = torch.empty(0, dtype=dtype).element_size()
    need_memory(device, 3 * BIG * esize)
    g = torch.Generator().manual_seed(10)
    fmt = torch.contiguous_format
    x, xv = big_tensor(SHAPE_C3, dtype, fmt, device, 0.75, WINDOWS, g)
    r, rv = big_tensor(SHAPE_C3, dtype, fmt, device, -0.5, WINDOWS, g)
    y = ops.add_relu(x, r, backend=_backend(device))
    del x, r
    assert y.shape == SHAPE_C3 and y.dtype == dtype
    fy = flat(y)
    for w in WINDOWS:
        s, e = w
        got = fy[s:e].cpu()
        eager = torch.relu(xv[w].to(dtype) + rv[w].to(dtype))
        ref64 = torch.relu(xv[w] + rv[w])
        numerics.assert_close_to_reference(got, eager, ref64, dtype=dtype, what=f"add_relu window {w}")
    # The bulk between the windows: relu(0.75 - 0.5), read at a few far places.
    for i in BULK_PROBES:
        assert float(fy[i]) == 0.25, i


def _bn_case(device, dtype, fmt, shape=SHAPE_C3):
    """bn_apply (relu) then bn_backward (fixed statistics) over BIG elements,
    each output checked in the windows and the reductions in closed form."""
    esize = torch.empty(0, dtype=dtype).element_size()
    need_memory(device, 3 * BIG * esize + BIG // 8)
    be = _backend(device)
    g = torch.Generator().manual_seed(11)
    c = shape[1]
    scale = torch.tensor([0.75, 1.25, 0.5])[:c]
    shift = torch.tensor([0.5, -1.0, 0.25])[:c]  # bulk y > 0 in channels 0 and 2 only
    zb = 0.25
    z, zv = big_tensor(shape, dtype, fmt, device, zb, WINDOWS, g, scale=2.0)
    y, mask = ops.bn_apply(z, scale.to(device), shift.to(device), None, True, backend=be)
    assert y.shape == shape and reference.memory_format_of(y) == reference.memory_format_of(z)
    assert mask.numel() == (BIG + 7) // 8
    fy = flat(y)
    ch_w, pos_w = {}, {}
    for w in WINDOWS:
        s, e = w
        ch = channel_of(torch.arange(s, e), shape, fmt)
        ch_w[w] = ch
        got = fy[s:e].cpu()
        acc = (zv[w].to(dtype).float() * scale[ch] + shift[ch]).to(dtype)
        eager = torch.relu(acc)
        ref64 = torch.relu(zv[w].to(dtype).double() * scale[ch].double() + shift[ch].double())
        numerics.assert_close_to_reference(got, eager, ref64, dtype=dtype, what=f"bn_apply window {w}")
        pos_w[w] = got > 0
        assert torch.equal(mask_bits(mask, s, e), pos_w[w]), f"mask bits in window {w}"
    # Bulk elements (constant z) far from the windows, and their mask bits.
    bulk_y = torch.relu((torch.tensor(zb, dtype=dtype).float() * scale + shift).to(dtype))
    for i in BULK_PROBES:
        cc = int(channel_of(torch.tensor(i), shape, fmt))
        assert float(fy[i]) == float(bulk_y[cc]), i
        assert bool(mask_bits(mask, i - i % 8, i - i % 8 + 8)[i % 8]) == bool(bulk_y[cc] > 0), i
    del y, fy

    # A small bulk gradient keeps the bulk's share of the sums (and so the
    # fp32 accumulation error over ~7e8 terms) small next to what one window
    # of large random values contributes.
    dyb = 2.0**-20
    dy, dyv = big_tensor(shape, dtype, fmt, device, dyb, WINDOWS, g, scale=64.0)
    weight = torch.tensor([1.5, 0.75, -1.0])[:c]
    zeros, ones = torch.zeros(c), torch.ones(c)
    dz, dres, dw, db = ops.bn_backward(dy, z, mask, zeros.to(device), ones.to(device), weight.to(device),
                                       False, False, backend=be)
    del dy, z
    assert dres.numel() == 0 and dz.shape == shape
    fdz = flat(dz)
    # Closed form of the per-channel sums (mean 0, invstd 1: xhat = z).
    count = BIG // c
    exp_db = torch.zeros(c, dtype=torch.float64)
    exp_dw = torch.zeros(c, dtype=torch.float64)
    win_abs = {"dbias": torch.zeros(c, dtype=torch.float64), "dweight": torch.zeros(c, dtype=torch.float64)}
    win_sum = {}  # per window and sum: its contribution per channel
    bulk_g = torch.where(bulk_y > 0, torch.tensor(dyb, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    zb_r = float(torch.tensor(zb, dtype=dtype))
    in_windows = torch.zeros(c, dtype=torch.float64)
    for w in WINDOWS:
        s, e = w
        ch = ch_w[w]
        gw = torch.where(pos_w[w], dyv[w], torch.zeros_like(dyv[w]))
        zw = zv[w].to(dtype).double()
        in_windows += torch.bincount(ch, minlength=c).double()
        exp_db += torch.bincount(ch, weights=gw, minlength=c)
        exp_dw += torch.bincount(ch, weights=gw * zw, minlength=c)
        win_abs["dbias"] += torch.bincount(ch, weights=gw.abs(), minlength=c)
        win_abs["dweight"] += torch.bincount(ch, weights=(gw * zw).abs(), minlength=c)
        win_sum[("dbias", w)] = torch.bincount(ch, weights=gw, minlength=c)
        win_sum[("dweight", w)] = torch.bincount(ch, weights=gw * zw, minlength=c)
        got = fdz[s:e].cpu()
        eager = (weight[ch] * gw.float()).to(dtype)
        numerics.assert_close_to_reference(got, eager, weight[ch].double() * gw, dtype=dtype, kind="grad",
                                           what=f"bn_backward dz window {w}")
    bulk_n = count - in_windows
    exp_db += bulk_g * bulk_n
    exp_dw += bulk_g * zb_r * bulk_n
    bulk_abs = {"dbias": bulk_g.abs() * bulk_n, "dweight": (bulk_g * zb_r).abs() * bulk_n}
    # The kernels add ~1.3e5 fp32 block partials in order; adding the same
    # bulk partial over and over rounds the same way each time, so the sum can
    # drift by up to nblocks * 2**-24 relative (measured: 0.7 % of the bulk's
    # share, bf16 channels_last). 2 % of the bulk's share plus 1e-4 of the
    # windows' passes a correct kernel and is far below what one dropped or
    # misread window moves a sum (checked just below).
    for name, got, exp in (("dbias", db, exp_db), ("dweight", dw, exp_dw)):
        err = (got.cpu().double() - exp).abs()
        tol = 2e-2 * bulk_abs[name] + 1e-4 * win_abs[name] + 1e-3
        assert (err <= tol).all(), f"{name}: got {got.tolist()}, expected {exp.tolist()} (tolerance {tol.tolist()})"
        for w in WINDOWS:  # every window matters at this tolerance (else the check would prove nothing)
            assert (win_sum[(name, w)].abs() > 5 * tol).any(), (name, w, win_sum[(name, w)].tolist(), tol.tolist())
    for i in BULK_PROBES:
        cc = int(channel_of(torch.tensor(i), shape, fmt))
        want = float((weight[cc] * bulk_g[cc]).to(dtype))
        assert float(fdz[i]) == want, i


@pytest.mark.slow
@pytest.mark.parametrize("device", _device_params())
@pytest.mark.parametrize("dtype,fmt", [(torch.float16, torch.contiguous_format),
                                       (torch.bfloat16, torch.channels_last)],
                         ids=["fp16-contiguous", "bf16-channels_last"])
def test_bn_apply_and_backward_beyond_int32(device, dtype, fmt):
    _gate(device)
    _bn_case(device, dtype, fmt)


@pytest.mark.slow
@pytest.mark.parametrize("device", _device_params())
def test_bn_stats_more_than_2_31_values_per_channel(device):
    _gate(device)
    dtype = torch.float16
    need_memory(device, BIG * 2)
    g = torch.Generator().manual_seed(12)
    a = 0.75
    z, zv = big_tensor(SHAPE_C1, dtype, torch.contiguous_format, device, (a, -a), WINDOWS, g, scale=64.0)
    mean, var = ops.bn_stats(z, backend=_backend(device))
    del z
    # Closed form in fp64: the alternating bulk, minus what the windows overwrote, plus the windows.
    s1 = a * (BIG // 2) - a * (BIG // 2)
    s2 = a * a * BIG
    for (s, e), v in zv.items():
        idx = torch.arange(s, e, dtype=torch.float64)
        bulk = torch.where(idx % 2 == 0, torch.tensor(a, dtype=torch.float64), torch.tensor(-a, dtype=torch.float64))
        vv = v.to(dtype).double()
        s1 += float(vv.sum() - bulk.sum())
        s2 += float((vv * vv).sum() - (bulk * bulk).sum())
    exp_mean = s1 / BIG
    exp_var = s2 / BIG - exp_mean**2
    assert mean.shape == var.shape == (1,) and mean.dtype == torch.float32
    rms = (s2 / BIG) ** 0.5
    # Dropping or misreading the smallest window would move the mean by
    # ~1.3e-6 and the variance by 0.7 %; the kernel's fp32 partials merged in
    # double are far more accurate than that (with fp32 merging the mean was
    # off by 8e-4 here: the first element, an outlier, is the shift).
    assert abs(float(mean) - exp_mean) <= 2e-7 * rms, (float(mean), exp_mean)
    assert abs(float(var) - exp_var) <= 1e-5 * exp_var, (float(var), exp_var)
    # Without the windows the variance would be a**2: the windows (3 in 2**31) must count.
    assert exp_var > 1.02 * a * a


@pytest.mark.slow
@pytest.mark.cuda
def test_triton_conv_beyond_int32():
    """The Triton conv with residual, ReLU and the statistics epilogue on an
    input and output of more than 2**31 elements (channels_last fp16)."""
    pytest.importorskip("triton")
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    n, c, h, w = 2, 8, 16385, 8192  # 2 * 8 * 16385 * 8192 = 2**31 + 2**17
    numel = n * c * h * w
    assert numel > 2**31
    need_memory("cuda", 3 * numel * 2 + numel)
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(13)
    x = torch.randn((n, c, h, w), generator=g, device=dev, dtype=torch.float16).contiguous(
        memory_format=torch.channels_last)
    r = torch.randn((n, c, h, w), generator=g, device=dev, dtype=torch.float16).contiguous(
        memory_format=torch.channels_last)
    wt = (torch.randn((c, c, 3, 3), generator=g, device=dev) * 0.2).half()
    shift = torch.randn(c, generator=g, device=dev)
    y, s, ss = ops.conv2d_bn_act(x, wt, None, shift, r, True, 1, 1, 1, 1, True, backend="triton")
    assert y.shape == (n, c, h, w)
    # Output rows: the first ones, and the last ones (their elements lie past 2**31).
    for img, h0, h1 in ((0, 0, 3), (1, h - 4, h)):
        lo, hi = max(h0 - 1, 0), min(h1 + 1, h)
        xs = x[img:img + 1, :, lo:hi]
        pad = (1, 1, 1 if h0 == 0 else 0, 1 if h1 == h else 0)
        rs = r[img:img + 1, :, h0:h1]

        def unit(xx, ww, rr, sh):
            return torch.relu(F.conv2d(F.pad(xx, pad), ww) + sh.view(1, -1, 1, 1) + rr)

        eager = unit(xs, wt, rs, shift.half())
        ref64 = unit(xs.double().cpu(), wt.double().cpu(), rs.double().cpu(), shift.double().cpu())
        numerics.assert_close_to_reference(y[img:img + 1, :, h0:h1], eager, ref64, dtype=torch.float16,
                                           what=f"triton conv rows {h0}:{h1} of image {img}")
    # Statistics of the raw conv output over all 2**28 output pixels: eager
    # fp32 conv + sum against fp64 conv + sum (TF32 is off, see conftest).
    del y, r
    z64 = F.conv2d(x.double(), wt.double(), padding=1)
    ref_s, ref_ss = z64.sum(dim=(0, 2, 3)), z64.square().sum(dim=(0, 2, 3))
    del z64
    z32 = F.conv2d(x.float(), wt.float(), padding=1)
    eager_s, eager_ss = z32.sum(dim=(0, 2, 3)), z32.square().sum(dim=(0, 2, 3))
    del z32
    numerics.assert_close_to_reference(s, eager_s, ref_s, dtype=torch.float32, what="sum of z")
    numerics.assert_close_to_reference(ss, eager_ss, ref_ss, dtype=torch.float32, what="sum of z**2")
