"""Implicit-GEMM 2-D convolution forward over NHWC with fused epilogues.

The convolution is a GEMM per group g:
    rows    m = (n, oh, ow)            M = N * OH * OW
    columns c = output channel in g    COUT_G = C_out / groups
    depth   k = (kh, kw, ci)           K_G = KH * KW * CIN_G
The A tile is gathered from the NHWC input (zero outside the padded image),
the B tile is read from weights prepared as (groups, K_G, COUT_G) so its rows
are contiguous (see launch.prepare_weight).

MODE picks how k is walked (all three give the same numbers):
  MODE_GEMM     1x1, stride 1, no padding: the input *is* the A matrix.
  MODE_CBLOCK   one filter tap (kh, kw) per step and BLOCK_K input channels of
                it: the address math is per row, not per element, so this is
                the fast path whenever CIN_G fills a BLOCK_K.
  MODE_FLAT     k decomposed per element, so a step spans several taps: for
                the stem (C_in = 3) and thin groups (ResNeXt CIN_G = 4), where
                a tap has too few channels to fill a tensor-core K step.

Epilogue (constexpr flags, applied to the fp32 accumulator z before anything
is written): EMIT_STATS stores per-tile, per-channel sum(z) and sum(z*z) of the
raw conv output into [num_m_tiles, C_out] buffers (reduced on the host, in a
fixed order: no atomics, deterministic); then y = z * scale + shift + residual,
ReLU, cast to y's dtype.

BN + ReLU prologue (HAS_PROLOGUE, conv2d_fwd_prologue_kernel, training): x
is the previous conv's raw output and every A tile is turned into
relu(x * pre_scale[c] + pre_shift[c]) as it is loaded (masked-off elements,
zero padding included, stay 0), so the previous layer's normalised
activation is never written to memory.

Prologue backward (PROLOGUE_BWD, conv2d_dgrad_prologue_kernel, training):
the data gradient of a stride-1 conv is itself a stride-1 conv of dz with
the flipped, transposed weight; this mode runs it and, instead of writing
d(activation), applies the prologue's ReLU backward (from the recomputed
activation of x_prev) and BN backward in the epilogue: it writes
dx_prev = dpre * pre_scale and per-tile sums of dpre * x_prev and dpre
(the gradients of pre_scale and pre_shift), so one kernel replaces the
dgrad's write and four elementwise passes over it.

Projection shortcut (HAS_SHORTCUT, inference): after the main K loop a second
GEMM accumulates x2[n, oh*s2, ow*s2, :] @ w2 into the same fp32 accumulator,
where x2 is the block input (NHWC, C2 channels) and w2 the downsample 1x1 conv
with its BN folded, prepared like w with one group as (C2, C_out). The
epilogue then sees z = conv(x, w) + conv1x1(x2, w2, stride s2) and adds the
sum of both folded biases as `shift`: one kernel, one write, no shortcut
tensor. conv2d_fwd_kernel is the kernel without it (its signature and code
are those of every earlier version); conv2d_fwd_shortcut_kernel takes the
extra arguments. Both are thin entry points into one body, _conv2d_fwd.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Part of every autotune cache key: bump when the kernel changes in a way that
# could change which config is fastest or whether a config compiles.
KERNEL_VERSION = "conv2d_fwd-v4"

MODE_GEMM = 0
MODE_CBLOCK = 1
MODE_FLAT = 2


@triton.jit
def _bn_relu_prologue(a, a_ok, pre_scale_ptr, pre_shift_ptr, chan, chan_ok):
    """relu(a * pre_scale[chan] + pre_shift[chan]) for a loaded A tile, in
    fp32 and rounded back to a's dtype (eager rounds BN's output, and ReLU
    commutes with rounding), with every masked-off element (zero padding,
    rows or channels out of range) kept at 0: padding must stay 0 after the
    prologue, not become relu(shift)."""
    ps = tl.load(pre_scale_ptr + chan, mask=chan_ok, other=0.0)
    pt = tl.load(pre_shift_ptr + chan, mask=chan_ok, other=0.0)
    v = a.to(tl.float32) * ps[None, :] + pt[None, :]
    v = tl.where(v < 0.0, 0.0, v)  # NaN stays NaN, as torch.relu
    return tl.where(a_ok, v, 0.0).to(a.dtype)


@triton.jit
def _conv2d_fwd(
    x_ptr, w_ptr, y_ptr,
    scale_ptr, shift_ptr, res_ptr, psum_ptr, psumsq_ptr, x2_ptr, w2_ptr, pre_scale_ptr, pre_shift_ptr,
    M, H, W, C_in, OH, OW, C_out, CIN_G, COUT_G,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    H2, W2, C2, stride2_h, stride2_w,
    KH: tl.constexpr, KW: tl.constexpr, MODE: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr, EMIT_STATS: tl.constexpr, HAS_SHORTCUT: tl.constexpr, HAS_PROLOGUE: tl.constexpr,
    PROLOGUE_BWD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)

    # Grouped ordering: GROUP_M row tiles share each weight column tile while
    # it is still in L2, instead of sweeping all of M per column tile.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(COUT_G, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < COUT_G

    K_G = KH * KW * CIN_G
    # int64 bases: N*H*W*C and groups*K_G*COUT_G may pass 2**31.
    w_base = w_ptr + g.to(tl.int64) * K_G * COUT_G
    x_cbase = x_ptr + g * CIN_G
    b_cols = offs_n[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if MODE == 0:
        a_rows = x_cbase + offs_m.to(tl.int64) * C_in
        for k0 in range(0, CIN_G, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < CIN_G
            a_ok = m_ok[:, None] & k_ok[None, :]
            a = tl.load(a_rows[:, None] + kk[None, :], mask=a_ok, other=0.0)
            if HAS_PROLOGUE:
                a = _bn_relu_prologue(a, a_ok, pre_scale_ptr, pre_shift_ptr, g * CIN_G + kk, k_ok)
            b = tl.load(w_base + kk[:, None] * COUT_G + b_cols, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        ow = offs_m % OW
        t = offs_m // OW
        oh = t % OH
        img_row = (t // OH).to(tl.int64) * H
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        if MODE == 1:
            n_cblk = tl.cdiv(CIN_G, BLOCK_K)
            # One flat loop over (tap, channel block) so the pipeliner sees a
            # single loop; the scalar div/mod per step is free next to the dot.
            for i in range(0, KH * KW * n_cblk):
                tap = i // n_cblk
                c0 = (i - tap * n_cblk) * BLOCK_K
                kh = tap // KW
                kw = tap - kh * KW
                ih = ih0 + kh * dil_h
                iw = iw0 + kw * dil_w
                row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a_rows = x_cbase + ((img_row + ih) * W + iw) * C_in
                kk = c0 + offs_k
                k_ok = kk < CIN_G
                a_ok = row_ok[:, None] & k_ok[None, :]
                a = tl.load(a_rows[:, None] + kk[None, :], mask=a_ok, other=0.0)
                if HAS_PROLOGUE:
                    a = _bn_relu_prologue(a, a_ok, pre_scale_ptr, pre_shift_ptr, g * CIN_G + kk, k_ok)
                b = tl.load(w_base + (tap * CIN_G + kk)[:, None] * COUT_G + b_cols,
                            mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        else:
            for k0 in range(0, K_G, BLOCK_K):
                kk = k0 + offs_k
                k_ok = kk < K_G
                ci = kk % CIN_G
                tap = kk // CIN_G
                kh = tap // KW
                kw = tap - kh * KW
                ih = ih0[:, None] + (kh * dil_h)[None, :]
                iw = iw0[:, None] + (kw * dil_w)[None, :]
                ok = (m_ok[:, None] & k_ok[None, :]) & ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
                a = tl.load(x_cbase + ((img_row[:, None] + ih) * W + iw) * C_in + ci[None, :], mask=ok, other=0.0)
                if HAS_PROLOGUE:
                    a = _bn_relu_prologue(a, ok, pre_scale_ptr, pre_shift_ptr, g * CIN_G + ci, k_ok)
                b = tl.load(w_base + kk[:, None] * COUT_G + b_cols, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if HAS_SHORTCUT:
        # Projection shortcut, a second GEMM into the same accumulator: row
        # m = (n, oh, ow) reads the block input x2 at (n, oh*s2, ow*s2); the
        # 1x1 conv has no padding, so every row in range is in the image.
        ow2 = offs_m % OW
        t2 = offs_m // OW
        oh2 = t2 % OH
        # int64 row offsets: N*H2*W2*C2 may pass 2**31.
        a2_rows = x2_ptr + (((t2 // OH).to(tl.int64) * H2 + oh2 * stride2_h) * W2 + ow2 * stride2_w) * C2
        # w2 is (C2, C_out), one group: C2*C_out stays far below 2**31.
        b2_cols = (g * COUT_G + offs_n)[None, :]
        for k0 in range(0, C2, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < C2
            a = tl.load(a2_rows[:, None] + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w2_ptr + kk[:, None] * C_out + b2_cols, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    chan = g * COUT_G + offs_n
    # One int64 base per tile and int32 offsets inside it: a [BM, BN] tensor
    # of int64 offsets costs two registers per element and made the big
    # tiles spill (ptxas) once the residual was loaded.
    tile_base = (pid_m * BLOCK_M).to(tl.int64) * C_out
    y_offs = tl.arange(0, BLOCK_M)[:, None] * C_out + chan[None, :]
    y_ok = m_ok[:, None] & n_ok[None, :]
    if PROLOGUE_BWD:
        # acc is d(activation) of the forward conv's input; res_ptr holds
        # that conv's raw input x_prev, scale/shift_ptr its prologue's
        # pre_scale/pre_shift. ReLU's backward from the recomputed, rounded
        # activation (as the forward prologue rounds it), then the prologue's
        # gradients: dx = dpre * pre_scale, and per-tile partial sums of
        # dpre * x_prev (-> d pre_scale) and dpre (-> d pre_shift).
        xp = tl.load(res_ptr + tile_base + y_offs, mask=y_ok, other=0.0)
        ps = tl.load(scale_ptr + chan, mask=n_ok, other=0.0)
        pt = tl.load(shift_ptr + chan, mask=n_ok, other=0.0)
        xf = xp.to(tl.float32)
        act = (xf * ps[None, :] + pt[None, :]).to(xp.dtype).to(tl.float32)
        dpre = tl.where(act > 0.0, acc, 0.0)  # masked rows: acc is 0 there
        stat_offs = pid_m.to(tl.int64) * C_out + chan
        tl.store(psum_ptr + stat_offs, tl.sum(dpre * xf, axis=0), mask=n_ok)
        tl.store(psumsq_ptr + stat_offs, tl.sum(dpre, axis=0), mask=n_ok)
        out = dpre * ps[None, :]
    else:
        if EMIT_STATS:
            # Rows past M and columns past COUT_G hold exact zeros (their loads
            # were masked to 0), so they add nothing to the sums.
            stat_offs = pid_m.to(tl.int64) * C_out + chan
            tl.store(psum_ptr + stat_offs, tl.sum(acc, axis=0), mask=n_ok)
            tl.store(psumsq_ptr + stat_offs, tl.sum(acc * acc, axis=0), mask=n_ok)

        out = acc
        if HAS_SCALE:
            out = out * tl.load(scale_ptr + chan, mask=n_ok, other=0.0)[None, :]
        if HAS_SHIFT:
            out = out + tl.load(shift_ptr + chan, mask=n_ok, other=0.0)[None, :]
        if HAS_RESIDUAL:
            out = out + tl.load(res_ptr + tile_base + y_offs, mask=y_ok, other=0.0).to(tl.float32)
        if RELU:
            # where(out < 0) rather than maximum: NaN stays NaN, as torch.relu does.
            out = tl.where(out < 0.0, 0.0, out)
    tl.store(y_ptr + tile_base + y_offs, out.to(y_ptr.dtype.element_ty), mask=y_ok)


@triton.jit
def conv2d_fwd_kernel(
    x_ptr, w_ptr, y_ptr,
    scale_ptr, shift_ptr, res_ptr, psum_ptr, psumsq_ptr,
    M, H, W, C_in, OH, OW, C_out, CIN_G, COUT_G,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, MODE: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr, EMIT_STATS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The conv without the shortcut GEMM (x2/w2 are never read)."""
    _conv2d_fwd(
        x_ptr, w_ptr, y_ptr, scale_ptr, shift_ptr, res_ptr, psum_ptr, psumsq_ptr, x_ptr, w_ptr, scale_ptr, shift_ptr,
        M, H, W, C_in, OH, OW, C_out, CIN_G, COUT_G,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        1, 1, 1, 1, 1,
        KH, KW, MODE, HAS_SCALE, HAS_SHIFT, HAS_RESIDUAL, RELU, EMIT_STATS, False, False, False, INPUT_PRECISION,
        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    )


@triton.jit
def conv2d_fwd_shortcut_kernel(
    x_ptr, w_ptr, y_ptr,
    scale_ptr, shift_ptr, res_ptr, psum_ptr, psumsq_ptr, x2_ptr, w2_ptr,
    M, H, W, C_in, OH, OW, C_out, CIN_G, COUT_G,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    H2, W2, C2, stride2_h, stride2_w,
    KH: tl.constexpr, KW: tl.constexpr, MODE: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr, EMIT_STATS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The conv plus the projection shortcut GEMM (HAS_SHORTCUT=True)."""
    _conv2d_fwd(
        x_ptr, w_ptr, y_ptr, scale_ptr, shift_ptr, res_ptr, psum_ptr, psumsq_ptr, x2_ptr, w2_ptr, scale_ptr, shift_ptr,
        M, H, W, C_in, OH, OW, C_out, CIN_G, COUT_G,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        H2, W2, C2, stride2_h, stride2_w,
        KH, KW, MODE, HAS_SCALE, HAS_SHIFT, HAS_RESIDUAL, RELU, EMIT_STATS, True, False, False, INPUT_PRECISION,
        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    )


@triton.jit
def conv2d_fwd_prologue_kernel(
    x_ptr, w_ptr, y_ptr,
    scale_ptr, shift_ptr, res_ptr, psum_ptr, psumsq_ptr, pre_scale_ptr, pre_shift_ptr,
    M, H, W, C_in, OH, OW, C_out, CIN_G, COUT_G,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, MODE: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr, EMIT_STATS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The conv of relu(x * pre_scale + pre_shift) (HAS_PROLOGUE=True): x is
    the previous conv's raw output, pre_scale/pre_shift (fp32, one per input
    channel) its BatchNorm; the normalised activation is never written."""
    _conv2d_fwd(
        x_ptr, w_ptr, y_ptr, scale_ptr, shift_ptr, res_ptr, psum_ptr, psumsq_ptr, x_ptr, w_ptr,
        pre_scale_ptr, pre_shift_ptr,
        M, H, W, C_in, OH, OW, C_out, CIN_G, COUT_G,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        1, 1, 1, 1, 1,
        KH, KW, MODE, HAS_SCALE, HAS_SHIFT, HAS_RESIDUAL, RELU, EMIT_STATS, False, True, False, INPUT_PRECISION,
        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    )


@triton.jit
def conv2d_dgrad_prologue_kernel(
    dz_ptr, w_ptr, dx_ptr, x_prev_ptr, pre_scale_ptr, pre_shift_ptr, psum_ptr, psumsq_ptr,
    M, H, W, C_in, OH, OW, C_out, CIN_G, COUT_G,
    pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, MODE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Backward of a stride-1 conv of relu(x_prev * pre_scale + pre_shift)
    (PROLOGUE_BWD=True): the data gradient as the forward conv of dz with the
    flipped, transposed weight (launch.prepare_dgrad_weight; here C_in / H, W
    are dz's channels and size, C_out / OH, OW those of x_prev), and the
    prologue's ReLU + BN backward in its epilogue, so d(activation) is never
    written: dx_prev and the per-tile sums for d pre_scale and d pre_shift."""
    _conv2d_fwd(
        dz_ptr, w_ptr, dx_ptr, pre_scale_ptr, pre_shift_ptr, x_prev_ptr, psum_ptr, psumsq_ptr, dz_ptr, w_ptr,
        pre_scale_ptr, pre_shift_ptr,
        M, H, W, C_in, OH, OW, C_out, CIN_G, COUT_G,
        1, 1, pad_h, pad_w, dil_h, dil_w,
        1, 1, 1, 1, 1,
        KH, KW, MODE, False, False, False, False, False, False, False, True, INPUT_PRECISION,
        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    )
