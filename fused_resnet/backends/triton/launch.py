"""Host side of the Triton convolution: weight layout, output allocation,
mode and config choice (autotuned, cached on disk), grid, dtype rules.

Called by fused_resnet.ops.conv2d_bn_act for CUDA tensors, and for CPU
tensors when the Triton interpreter is on (TRITON_INTERPRET=1 at import).
"""

from __future__ import annotations

import threading
import time
import warnings
import weakref
from collections import OrderedDict

import torch
import triton

from ... import _compat, config
from ...ops import conv_args
from . import autotune_budget, autotune_cache, conv_configs
from .conv2d_fwd import (KERNEL_VERSION, MODE_CBLOCK, MODE_FLAT, MODE_GEMM, conv2d_dgrad_prologue_kernel,
                         conv2d_fwd_kernel, conv2d_fwd_prologue_kernel, conv2d_fwd_shortcut_kernel)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Below this many input channels per group a filter tap cannot fill a
# tensor-core K step, so K is walked across taps (MODE_FLAT).
FLAT_K_BELOW_CIN_G = 32


# Triton's interpreter runs these kernels on CPU tensors in tests; older
# releases of it need a fix to run with today's NumPy (see the function).
_compat.patch_triton_interpreter()


# ---------------------------------------------------------------- weights

# Each weight's prepared layout, keyed on the weight tensor's identity and
# held only while the weight lives: the entry holds a weak reference to the
# weight, whose death drops the entry (and frees the layout) at once, so a
# freed model's layouts never linger and a new tensor that reuses a dead
# one's id() can never be served its layout. At most _WEIGHT_CACHE_SIZE
# entries, least recently used first out.
_WEIGHT_CACHE_SIZE = 256
_weight_cache: OrderedDict = OrderedDict()  # (id, groups, kind) -> (ref, data_ptr, version, prepared)
_weight_lock = threading.Lock()
_dead_keys: list = []  # keys of dead weights not yet dropped (their callback found the lock taken)


def _weight_layout(weight: torch.Tensor, groups: int) -> torch.Tensor:
    c_out, cin_g, kh, kw = weight.shape
    cout_g = c_out // groups
    # (C_out, Cin_g, KH, KW) -> (groups, KH, KW, Cin_g, Cout_g): K index is
    # (kh, kw, ci) as the kernel walks it and each B-tile row is contiguous.
    w = weight.detach().reshape(groups, cout_g, cin_g, kh, kw).permute(0, 3, 4, 2, 1)
    return w.reshape(groups, kh * kw * cin_g, cout_g).contiguous()


def _dgrad_weight_layout(weight: torch.Tensor, groups: int) -> torch.Tensor:
    # The data gradient of a stride-1 conv is a conv of dz with each group's
    # weight transposed (C_out_g <-> Cin_g) and its taps flipped; laid out
    # as _weight_layout lays out a forward weight of that shape.
    c_out, cin_g, kh, kw = weight.shape
    cout_g = c_out // groups
    wt = weight.detach().reshape(groups, cout_g, cin_g, kh, kw).transpose(1, 2).flip(3, 4)
    return _weight_layout(wt.reshape(groups * cin_g, cout_g, kh, kw), groups)


def _drop_dead_keys() -> None:
    # Under _weight_lock.
    while _dead_keys:
        key, ref = _dead_keys.pop()
        entry = _weight_cache.get(key)
        if entry is not None and entry[0] is ref:
            del _weight_cache[key]


def _on_weight_death(key):
    def callback(ref) -> None:
        _dead_keys.append((key, ref))
        # The garbage collector may run this inside a cache operation of
        # this very thread: then the next operation drops the entry instead.
        if _weight_lock.acquire(blocking=False):
            try:
                _drop_dead_keys()
            finally:
                _weight_lock.release()

    return callback


def _cached_layout(weight: torch.Tensor, groups: int, kind: str, layout) -> torch.Tensor:
    key = (id(weight), groups, kind)
    with _weight_lock:
        _drop_dead_keys()
        hit = _weight_cache.get(key)
        if hit is not None:
            ref, ptr, version, prepared = hit
            if ref() is weight and ptr == weight.data_ptr() and version == _compat.version_counter(weight):
                _weight_cache.move_to_end(key)
                return prepared
    prepared = layout(weight, groups)
    ref = weakref.ref(weight, _on_weight_death(key))
    with _weight_lock:
        _drop_dead_keys()
        _weight_cache[key] = (ref, weight.data_ptr(), _compat.version_counter(weight), prepared)
        while len(_weight_cache) > _WEIGHT_CACHE_SIZE:
            _weight_cache.popitem(last=False)
    return prepared


def weight_cache_size() -> int:
    """How many prepared weight layouts are cached (for tests and diagnostics)."""
    with _weight_lock:
        _drop_dead_keys()
        return len(_weight_cache)


def prepare_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Weights as (groups, KH*KW*Cin_g, Cout_g), contiguous, cached per weight
    tensor while it lives (see _weight_cache): valid while the tensor, its
    storage and its version counter (bumped by every in-place update, e.g.
    an optimizer step) are unchanged."""
    return _cached_layout(weight, groups, "fwd", _weight_layout)


def prepare_dgrad_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The data-gradient weights (groups, KH*KW*Cout_g, Cin_g) of a stride-1
    conv: flipped taps, each group transposed; cached as prepare_weight."""
    return _cached_layout(weight, groups, "dgrad", _dgrad_weight_layout)


def clear_weight_cache() -> None:
    with _weight_lock:
        _weight_cache.clear()
        _dead_keys.clear()


# ---------------------------------------------------------------- configs

_chosen: dict[str, conv_configs.ConvConfig] = {}
_chosen_lock = threading.Lock()


def _input_precision(dtype: torch.dtype) -> str:
    # TF32 only where PyTorch's own convolution would use it.
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


_tuning = threading.local()


def tuning() -> bool:
    """True while this thread times candidate configs (launch counters in
    tests skip those launches: how many there are depends on the autotune
    cache, not on the fused path)."""
    return getattr(_tuning, "active", False)


def _benchmark(run, cfg) -> float:
    _tuning.active = True
    try:
        return float(triton.testing.do_bench(lambda: run(cfg), warmup=5, rep=25))
    except torch.OutOfMemoryError:
        raise  # the problem's tensors, not the config: every candidate would fail the same way
    except Exception as exc:  # noqa: BLE001 - e.g. OutOfResources on a smaller part than sm_80/sm_90
        warnings.warn(f"fused_resnet: conv config {cfg.name} failed to run ({type(exc).__name__}: {exc}); skipped",
                      RuntimeWarning, stacklevel=2)
        return float("inf")
    finally:
        _tuning.active = False


def autotune_enabled() -> bool:
    """config "autotune" (set_autotune / $FUSED_RESNET_AUTOTUNE): off takes
    each problem's first candidate untimed (and writes nothing to the disk
    cache), a fast first call and a fixed choice, e.g. for test suites; on
    (the default) times every candidate."""
    return config.get("autotune")


def choose_config(key: str, cands: list[conv_configs.ConvConfig], run) -> conv_configs.ConvConfig:
    """The config for `key`: from memory, else the disk cache, else by timing
    the candidates with `run(cfg)` (which launches the real problem) within
    the tuning caps (autotune_budget); the first candidate untimed when
    autotuning is off (autotune_enabled) or the run's tuning budget is spent."""
    with _chosen_lock:
        cfg = _chosen.get(key)
    if cfg is not None:
        return cfg
    if not cands:
        raise RuntimeError(f"fused_resnet: no Triton conv config candidates for {key}")
    if not autotune_enabled():
        # Not remembered in _chosen either: turning autotuning back on in the
        # same process then tunes this key.
        return cands[0]
    by_name = {c.name: c for c in cands}
    cache = autotune_cache.get_cache(KERNEL_VERSION)
    name = cache.get(key)
    if name is not None and name not in by_name:
        warnings.warn(f"fused_resnet: autotune cache names unknown config {name!r} for {key}; re-tuning",
                      RuntimeWarning, stacklevel=2)
        name = None
    if name is None:
        name = _tune(key, cands, run, cache)
    cfg = by_name[name]
    with _chosen_lock:
        _chosen[key] = cfg
    return cfg


def _tune(key: str, cands: list[conv_configs.ConvConfig], run, cache) -> str:
    """Time the candidates in order until one of the caps stops it (at least
    one is timed); the fastest is written to the disk cache. With the run's
    budget already spent, the first candidate untimed, not cached."""
    budget = autotune_budget.current()
    entry = {"key": key, "candidates": len(cands)}
    if budget.run_spent():
        autotune_budget.log({**entry, "chosen": cands[0].name, "timed": 0, "seconds": 0.0,
                             "capped": f"run budget {budget.run_s:g} s spent before this key", "cached": False})
        return cands[0].name
    started = time.perf_counter()
    times: dict[str, float] = {}
    capped = None
    for cfg in cands:
        if times:
            capped = budget.key_over(started)
            if capped is not None:
                break
        times[cfg.name] = _benchmark(run, cfg)
    seconds = time.perf_counter() - started
    budget.charge(seconds)
    name = min(times, key=times.get)
    cached = times[name] != float("inf")
    if cached:
        cache.put(key, name)
    elif capped is None:
        raise RuntimeError(f"fused_resnet: no Triton conv config could run for {key}")
    else:
        # Every candidate timed before the cap failed: the next one, untimed
        # and not cached.
        name = next(c.name for c in cands if c.name not in times)
    autotune_budget.log({**entry, "chosen": name, "timed": len(times), "seconds": round(seconds, 3),
                         "capped": capped, "cached": cached,
                         "times_ms": {k: (None if v == float("inf") else round(v, 5)) for k, v in times.items()}})
    return name


# ---------------------------------------------------------------- launch


def _mode(kh, kw, stride, padding, cin_g) -> int:
    if kh == 1 and kw == 1 and tuple(stride) == (1, 1) and tuple(padding) == (0, 0):
        return MODE_GEMM
    if cin_g < FLAT_K_BELOW_CIN_G:
        return MODE_FLAT
    return MODE_CBLOCK


def _tuned_config(dev, dtype, precision, bucket_args, epilogue, cout_g, run,
                  pick=conv_configs.candidates) -> conv_configs.ConvConfig:
    if dev.type != "cuda":
        return conv_configs.INTERPRETER
    arch = conv_configs.arch_family(torch.cuda.get_device_capability(dev))
    bucket = conv_configs.shape_bucket(*bucket_args, epilogue)
    key = autotune_cache.make_key(arch, str(dtype).replace("torch.", "") + f"-{precision}", bucket, KERNEL_VERSION)
    return choose_config(key, pick(arch, dtype.itemsize, cout_g), run)


def conv2d_bn_act(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, emit_stats,
                  config: conv_configs.ConvConfig | None = None, *, x2=None, weight2=None, stride2=1,
                  pre_scale=None, pre_shift=None):
    """Run the Triton kernel. Same contract as reference.conv2d_bn_act; y is
    channels_last. `config` forces a tile config (tests, benchmarks).

    With `x2` and `weight2` (inference only: no statistics), the projection
    shortcut conv1x1(x2, weight2, stride2) is accumulated into the same tile
    before the epilogue: y = [relu]((conv(x, w) + conv1x1(x2, w2)) * scale +
    shift [+ residual]) (see reference.conv2d_bias_act_shortcut).

    With `pre_scale` and `pre_shift` (one per input channel) the conv reads
    relu(x * pre_scale + pre_shift) instead of x, applied to each input tile
    as it is loaded (see reference.conv2d_prologue_bn_act)."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"conv2d_bn_act (triton): `x` must be float16, bfloat16 or float32, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"conv2d_bn_act: `weight` has dtype {weight.dtype}, expected x's dtype {x.dtype}")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv2d_bn_act: `x` and `weight` must be 4-D, got {tuple(x.shape)} and {tuple(weight.shape)}")
    sh, sw = conv_args.pair(stride, "stride", "conv2d_bn_act")
    ph, pw = conv_args.pair(padding, "padding", "conv2d_bn_act")
    dh, dw = conv_args.pair(dilation, "dilation", "conv2d_bn_act")
    n, c_in, h, w = x.shape
    c_out, cin_g, kh, kw = weight.shape
    conv_args.check_groups(c_in, weight.shape, groups, "conv2d_bn_act")
    cout_g = c_out // groups
    oh, ow = conv_args.out_hw(x.shape, weight.shape, (sh, sw), (ph, pw), (dh, dw))
    if oh <= 0 or ow <= 0:
        raise ValueError(f"conv2d_bn_act: output would be empty ({oh}x{ow}) for input {h}x{w}, kernel {kh}x{kw}")
    dev = x.device
    y = torch.empty((n, c_out, oh, ow), dtype=x.dtype, device=dev, memory_format=torch.channels_last)
    m = n * oh * ow
    conv_args.check_channel_vectors({"scale": scale, "shift": shift}, c_out, "output channel", "conv2d_bn_act")
    if residual is not None and tuple(residual.shape) != tuple(y.shape):
        raise ValueError(f"conv2d_bn_act: `residual` has shape {tuple(residual.shape)}, expected the output's {tuple(y.shape)}")

    shortcut = x2 is not None or weight2 is not None
    if shortcut:
        if x2 is None or weight2 is None:
            raise ValueError("conv2d_bn_act: the shortcut needs both `x2` and `weight2` (or neither)")
        if emit_stats:
            raise ValueError("conv2d_bn_act: the shortcut GEMM is inference-only; it cannot be combined with "
                             "emit_stats (the sums would include the shortcut)")
        s2h, s2w = conv_args.check_shortcut(x, x2, weight2, stride2, y.shape, "conv2d_bn_act")
        _, c2, h2, w2 = x2.shape

    prologue = pre_scale is not None or pre_shift is not None
    if prologue:
        if pre_scale is None or pre_shift is None:
            raise ValueError("conv2d_bn_act: the prologue needs both `pre_scale` and `pre_shift` (or neither)")
        if shortcut:
            raise ValueError("conv2d_bn_act: the BN prologue and the shortcut GEMM cannot be combined")
        conv_args.check_channel_vectors({"pre_scale": pre_scale, "pre_shift": pre_shift}, c_in, "input channel",
                                         "conv2d_bn_act")

    if m == 0 or c_out == 0:
        z = torch.zeros(c_out, dtype=torch.float32, device=dev)
        return (y, z, z.clone()) if emit_stats else (y, z[:0], z[:0])

    xc = x.contiguous(memory_format=torch.channels_last)
    wp = prepare_weight(weight, groups)
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    sc = scale.detach().to(device=dev, dtype=torch.float32).contiguous() if scale is not None else dummy
    sf = shift.detach().to(device=dev, dtype=torch.float32).contiguous() if shift is not None else dummy
    rs = residual.detach().contiguous(memory_format=torch.channels_last) if residual is not None else y
    if prologue:
        psc = pre_scale.detach().to(device=dev, dtype=torch.float32).contiguous()
        psh = pre_shift.detach().to(device=dev, dtype=torch.float32).contiguous()
    if shortcut:
        x2c = x2.detach().contiguous(memory_format=torch.channels_last)
        w2p = prepare_weight(weight2, 1)  # (1, C2, C_out): row k of the shortcut's B matrix is contiguous

    mode = _mode(kh, kw, (sh, sw), (ph, pw), cin_g)
    precision = _input_precision(x.dtype)

    stats_bufs = {}

    def run(cfg: conv_configs.ConvConfig):
        num_m_tiles = triton.cdiv(m, cfg.block_m)
        if emit_stats:
            shape = (num_m_tiles, c_out)
            if stats_bufs.get("shape") != shape:
                stats_bufs.update(shape=shape, s=torch.empty(shape, dtype=torch.float32, device=dev),
                                  q=torch.empty(shape, dtype=torch.float32, device=dev))
            ps, pq = stats_bufs["s"], stats_bufs["q"]
        else:
            ps = pq = dummy
        grid = (num_m_tiles * triton.cdiv(cout_g, cfg.block_n), groups)
        meta = dict(KH=kh, KW=kw, MODE=mode,
                    HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, HAS_RESIDUAL=residual is not None,
                    RELU=bool(relu), EMIT_STATS=bool(emit_stats), INPUT_PRECISION=precision,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.meta())
        # By keyword: the kernels' parameter names (conv2d_fwd.py) say what each is.
        args = dict(x_ptr=xc, w_ptr=wp, y_ptr=y, scale_ptr=sc, shift_ptr=sf, res_ptr=rs, psum_ptr=ps, psumsq_ptr=pq,
                    M=m, H=h, W=w, C_in=c_in, OH=oh, OW=ow, C_out=c_out, CIN_G=cin_g, COUT_G=cout_g,
                    stride_h=sh, stride_w=sw, pad_h=ph, pad_w=pw, dil_h=dh, dil_w=dw)
        if shortcut:
            conv2d_fwd_shortcut_kernel[grid](**args, x2_ptr=x2c, w2_ptr=w2p, H2=h2, W2=w2, C2=c2, stride2_h=s2h,
                                             stride2_w=s2w, **meta)
        elif prologue:
            conv2d_fwd_prologue_kernel[grid](**args, pre_scale_ptr=psc, pre_shift_ptr=psh, **meta)
        else:
            conv2d_fwd_kernel[grid](**args, **meta)

    if config is None:
        epilogue = ("stats" if emit_stats else "") + ("res" if residual is not None else "") or "plain"
        if shortcut:
            # The shortcut GEMM's depth and stride change the tile's work
            # and registers: its own autotune entry.
            epilogue += f"-sc{c2}s{s2h}x{s2w}"
        if prologue:
            epilogue += "-pro"  # the prologue's loads and math per A tile
        config = _tuned_config(dev, x.dtype, precision, (m, c_in, c_out, kh, kw, (sh, sw), (dh, dw), groups),
                               epilogue, cout_g, run)
    run(config)

    if emit_stats:
        # Fixed-order reduction of the per-tile partials: deterministic.
        return y, stats_bufs["s"].sum(dim=0), stats_bufs["q"].sum(dim=0)
    return y, torch.empty(0, dtype=torch.float32, device=dev), torch.empty(0, dtype=torch.float32, device=dev)


def conv2d_dgrad_prologue(dz, weight, x_prev, pre_scale, pre_shift, padding, dilation, groups,
                          config: conv_configs.ConvConfig | None = None):
    """Backward of z = conv2d(relu(x_prev * pre_scale + pre_shift), weight)
    with stride 1, in one kernel: (dx_prev, d_pre_scale, d_pre_shift) from
    dz = dL/dz (see reference.conv2d_dgrad_prologue). dx_prev is
    channels_last in x_prev's dtype; the sums are fp32, reduced from per-tile
    partials in a fixed order (deterministic). Needs padding <= dilation *
    (kernel - 1) per dim (true of every ResNet conv)."""
    if x_prev.dtype not in SUPPORTED_DTYPES or dz.dtype != x_prev.dtype or weight.dtype != x_prev.dtype:
        raise TypeError(f"conv2d_dgrad_prologue (triton): `dz`, `weight` and `x_prev` must share one dtype of "
                        f"float16, bfloat16 or float32, got {dz.dtype}, {weight.dtype} and {x_prev.dtype}")
    ph, pw = conv_args.pair(padding, "padding", "conv2d_dgrad_prologue")
    dh, dw = conv_args.pair(dilation, "dilation", "conv2d_dgrad_prologue")
    n, c_in, h, w = x_prev.shape
    c_out, cin_g, kh, kw = weight.shape
    conv_args.check_groups(c_in, weight.shape, groups, "conv2d_dgrad_prologue", "x_prev")
    oh, ow = conv_args.out_hw(x_prev.shape, weight.shape, (1, 1), (ph, pw), (dh, dw))
    if tuple(dz.shape) != (n, c_out, oh, ow):
        raise ValueError(f"conv2d_dgrad_prologue: `dz` has shape {tuple(dz.shape)}, expected the forward output's "
                         f"{(n, c_out, oh, ow)}")
    # The data gradient's own padding; negative would need a cropped conv.
    qh, qw = dh * (kh - 1) - ph, dw * (kw - 1) - pw
    if qh < 0 or qw < 0:
        raise ValueError(f"conv2d_dgrad_prologue: padding {(ph, pw)} exceeds dilation * (kernel - 1) = "
                         f"{(dh * (kh - 1), dw * (kw - 1))}; use the unfused backward")
    conv_args.check_channel_vectors({"pre_scale": pre_scale, "pre_shift": pre_shift}, c_in, "channel of `x_prev`",
                                     "conv2d_dgrad_prologue")
    dev = x_prev.device
    dx = torch.empty((n, c_in, h, w), dtype=x_prev.dtype, device=dev, memory_format=torch.channels_last)
    m = n * h * w
    if m == 0 or c_in == 0 or c_out == 0:
        dx.zero_()  # nothing flows back (or dx is empty)
        zeros = torch.zeros(c_in, dtype=torch.float32, device=dev)
        return dx, zeros, zeros.clone()

    dzc = dz.detach().contiguous(memory_format=torch.channels_last)
    xpc = x_prev.detach().contiguous(memory_format=torch.channels_last)
    wp = prepare_dgrad_weight(weight, groups)
    psc = pre_scale.detach().to(device=dev, dtype=torch.float32).contiguous()
    psh = pre_shift.detach().to(device=dev, dtype=torch.float32).contiguous()
    # The dgrad conv reads dz (C_out channels, cout_g per group) and writes
    # x_prev's shape (C_in channels, cin_g per group).
    mode = _mode(kh, kw, (1, 1), (qh, qw), c_out // groups)
    precision = _input_precision(x_prev.dtype)
    bufs = {}

    def run(cfg: conv_configs.ConvConfig):
        num_m_tiles = triton.cdiv(m, cfg.block_m)
        if bufs.get("tiles") != num_m_tiles:
            bufs.update(tiles=num_m_tiles, s=torch.empty((num_m_tiles, c_in), dtype=torch.float32, device=dev),
                        q=torch.empty((num_m_tiles, c_in), dtype=torch.float32, device=dev))
        grid = (num_m_tiles * triton.cdiv(cin_g, cfg.block_n), groups)
        # dz is the conv's input here: its size and channels are H, W, C_in.
        conv2d_dgrad_prologue_kernel[grid](
            dz_ptr=dzc, w_ptr=wp, dx_ptr=dx, x_prev_ptr=xpc, pre_scale_ptr=psc, pre_shift_ptr=psh,
            psum_ptr=bufs["s"], psumsq_ptr=bufs["q"],
            M=m, H=oh, W=ow, C_in=c_out, OH=h, OW=w, C_out=c_in, CIN_G=c_out // groups, COUT_G=cin_g,
            pad_h=qh, pad_w=qw, dil_h=dh, dil_w=dw,
            KH=kh, KW=kw, MODE=mode, INPUT_PRECISION=precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.meta(),
        )

    if config is None:
        config = _tuned_config(dev, x_prev.dtype, precision, (m, c_out, c_in, kh, kw, (1, 1), (dh, dw), groups),
                               "dgrad-pro", cin_g, run, pick=conv_configs.dgrad_candidates)
    run(config)
    return dx, bufs["s"].sum(dim=0), bufs["q"].sum(dim=0)
