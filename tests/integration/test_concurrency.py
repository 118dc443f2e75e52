"""Concurrency and cached state (issue 7, item 4).

- Inference from several Python threads at once on one fused model gives
  bitwise the results of serial runs (the threads start together at a
  barrier, on cold fold caches, so they really race to fill them).
- The fold cache (fused_resnet/nn/fold.py) is keyed correctly: two models
  never share a folded entry; one model used with fp32 then fp64, contiguous
  then channels_last, and many batch sizes (oneDNN's prepacked weights are
  keyed by the input shape) always matches the reference backend.
- The Triton autotune cache (fused_resnet/triton/autotune_cache.py): a
  corrupted or unreadable file is ignored with a warning, never a crash;
  concurrent writers never expose half a file; keys differ for different
  architectures, dtypes/precisions and problem shapes.

The cuDNN graph cache has its own C++ self-test in tests/backends/cudnn/test_cudnn.py.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import warnings

import pytest
import torch

import fused_resnet
from fused_resnet import numerics
from fused_resnet.backends import fold
from fused_resnet.backends.triton import autotune_cache as ac
from helpers import randomise_bn

BACKENDS = ["cpu", "reference"]
THREADS = 4


def _model(backend: str, seed: int = 0, num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = fused_resnet.resnet18(num_classes=num_classes)
    randomise_bn(m)
    m.set_backend(backend)
    return m.eval()


def _twins(model: torch.nn.Module):
    """(same model on backend="reference", fp64 copy of that): the fp32
    eager result and the high-precision one of the numerics criterion."""
    ref = copy.deepcopy(model)
    ref.set_backend("reference")
    ref64 = copy.deepcopy(ref).double()
    return ref, ref64


def _check(model, ref, ref64, x, what):
    with torch.no_grad():
        y = model(x)
        ye = ref(x)
        yr = ref64(x.double())
    assert y.dtype == x.dtype, what
    numerics.assert_close_to_reference(y, ye, yr, dtype=x.dtype, what=what)
    return y


def _run_threads(fn, n: int) -> None:
    """Run fn(i) in n threads released together by a barrier; re-raise the
    first exception any of them hit."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def body(i):
        try:
            barrier.wait(timeout=60)
            fn(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), name=f"infer-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    if errors:
        raise errors[0]


# ------------------------------------------------------------ threaded inference


def _inputs():
    """Per thread, a few inputs: different values, batch sizes and layouts,
    so the threads also race on different fold/prepack cache entries."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(THREADS):
        xs = []
        for j, n in enumerate((2, 2, 1 + i % 3)):
            x = torch.randn(n, 3, 32, 32, generator=g)
            if (i + j) % 2:
                x = x.contiguous(memory_format=torch.channels_last)
            xs.append(x)
        out.append(xs)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_threaded_inference_is_bitwise_serial(backend):
    model = _model(backend)
    ref, ref64 = _twins(model)
    inputs = _inputs()
    with torch.no_grad():
        serial = [[model(x) for x in xs] for xs in inputs]
    # The serial results are right (so equality below means something).
    for xs, ys in zip(inputs, serial):
        for x, y in zip(xs, ys):
            numerics.assert_close_to_reference(y, ref(x), ref64(x.double()), what=f"serial {backend}")

    for rnd in range(2):
        fold.clear(model)  # cold caches: the threads fill them concurrently
        results: dict[int, list[torch.Tensor]] = {}

        def work(i):
            with torch.no_grad():
                # Twice over this thread's inputs, interleaved with the others.
                outs = [model(x) for x in inputs[i] + inputs[i]]
            results[i] = outs

        _run_threads(work, THREADS)
        for i in range(THREADS):
            expect = serial[i] + serial[i]
            assert len(results[i]) == len(expect)
            for k, (got, want) in enumerate(zip(results[i], expect)):
                assert got.shape == want.shape
                assert torch.equal(got, want), (
                    f"{backend} round {rnd}, thread {i}, input {k}: threaded result differs from serial "
                    f"(max diff {(got - want).abs().max().item():.3g})"
                )


def test_threads_on_two_models_do_not_mix():
    """Threads alternate between two models with different weights (and the
    same shapes, so identical cache keys apart from the tensors)."""
    models = [_model("cpu", seed=s) for s in (0, 1)]
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(THREADS)]
    with torch.no_grad():
        serial = {(m, i): models[m](x) for m in range(2) for i, x in enumerate(xs)}
    for m, model in enumerate(models):  # each model's serial results are its own
        ref, ref64 = _twins(model)
        for i, x in enumerate(xs):
            with torch.no_grad():
                numerics.assert_close_to_reference(serial[(m, i)], ref(x), ref64(x.double()),
                                                   what=f"serial, model {m}")
    assert not torch.equal(serial[(0, 0)], serial[(1, 0)])
    for m in models:
        fold.clear(m)
    results = {}

    def work(i):
        with torch.no_grad():
            for r in range(4):
                m = (i + r) % 2
                results[(i, r)] = (m, models[m](xs[i]))

    _run_threads(work, THREADS)
    for (i, r), (m, y) in results.items():
        assert torch.equal(y, serial[(m, i)]), f"thread {i}, step {r}: model {m} gave another model's result"


# -------------------------------------------------------------------- fold cache


def _cache_values(model):
    """Every cached fold value (tensors) of every BN of the model."""
    vals = []
    for mod in model.modules():
        cache = fold.entries(mod)
        if cache:
            for v in cache.values():
                vals.extend(t for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor))
    return vals


@pytest.mark.parametrize("backend", ["cpu"])
def test_two_models_never_share_a_fold(backend):
    a = _model(backend, seed=0)
    b = copy.deepcopy(a)  # same architecture and, for now, the same weights
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(1.5)  # different weights, same shapes, every BN changed
        for mod in b.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.add_(0.25)
    ra, ra64 = _twins(a)
    rb, rb64 = _twins(b)
    x = torch.randn(2, 3, 32, 32)
    for step in range(3):  # a, b, a, b, ...: each one's cache warm while the other runs
        ya = _check(a, ra, ra64, x, f"model a, step {step}")
        yb = _check(b, rb, rb64, x, f"model b, step {step}")
        assert not torch.equal(ya, yb)
    va, vb = _cache_values(a), _cache_values(b)
    assert va and vb, "eval forward filled no fold cache"
    ptrs_a = {t.data_ptr() for t in va if t.layout == torch.strided}
    ptrs_b = {t.data_ptr() for t in vb if t.layout == torch.strided}
    assert not (ptrs_a & ptrs_b), "two models share cached folded tensors"
    assert not ({id(t) for t in va} & {id(t) for t in vb})


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_model_fp32_then_fp64_then_fp32(backend):
    model = _model(backend)
    x = torch.randn(2, 3, 32, 32)
    ref, ref64 = _twins(model)
    y32 = _check(model, ref, ref64, x, "fp32")
    model.double()
    ref.double()
    _check(model, ref, ref64, x.double(), "fp64 after fp32")
    # An fp32 input on the fp64 model is aten's dtype error, as in eager.
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            model(x)
    model.float()
    ref.float()
    y32b = _check(model, ref, ref64, x, "fp32 after fp64")
    assert torch.equal(y32, y32b), "the round trip fp32 -> fp64 -> fp32 changed the fp32 result"
    # An edit while in fp64 must still be seen after converting back.
    model.double()
    ref.double()
    ref64 = copy.deepcopy(ref)
    _check(model, ref, ref64, x.double(), "fp64 again")
    with torch.no_grad():
        for m in (model, ref, ref64):
            m.layer2[1].bn2.running_var.mul_(3.0)
            m.layer1[0].conv1.weight.mul_(-1.0)
    model.float()
    ref.float()
    y32c = _check(model, ref, ref64, x, "fp32 after an fp64 edit")
    assert not torch.equal(y32, y32c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_model_contiguous_then_channels_last(backend):
    model = _model(backend)
    ref, ref64 = _twins(model)
    x = torch.randn(2, 3, 32, 32)
    xcl = x.contiguous(memory_format=torch.channels_last)
    xs = x[..., ::1].transpose(2, 3).contiguous().transpose(2, 3)  # same values, another stride order
    for what, inp in [("contiguous", x), ("channels_last", xcl), ("transposed strides", xs), ("contiguous", x)]:
        _check(model, ref, ref64, inp, f"model contiguous, input {what}")
    model.to(memory_format=torch.channels_last)
    ref.to(memory_format=torch.channels_last)
    for what, inp in [("channels_last", xcl), ("contiguous", x), ("channels_last", xcl)]:
        _check(model, ref, ref64, inp, f"model channels_last, input {what}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_model_many_batch_sizes(backend):
    """More distinct input shapes than the cache keeps (fold._MAX_ENTRIES),
    revisited out of order: evictions and re-packs never serve the wrong
    shape's prepacked weights."""
    model = _model(backend)
    ref, ref64 = _twins(model)
    g = torch.Generator().manual_seed(3)
    shapes = [(2, 32, 32), (1, 32, 32), (3, 32, 32), (2, 40, 24), (5, 32, 32), (1, 33, 31), (2, 32, 32),
              (3, 32, 32), (1, 32, 32)]
    assert len(set(shapes)) > fold._MAX_ENTRIES
    for n, h, w in shapes:
        x = torch.randn(n, 3, h, w, generator=g)
        _check(model, ref, ref64, x, f"input {n}x3x{h}x{w}")
        if backend == "cpu":
            # The stem's prepacked weights are cached for this very input shape.
            keys = list(fold.entries(model.bn1))
            assert any(k[0] == "mkldnn" and tuple(x.shape) in k for k in keys), keys


def test_fold_cache_entry_counts_are_bounded():
    model = _model("cpu")
    with torch.no_grad():
        for n in range(1, 2 * fold._MAX_ENTRIES + 2):
            model(torch.randn(n, 3, 16, 16))
    for mod in model.modules():
        assert len(fold.entries(mod)) <= fold._MAX_ENTRIES


# ----------------------------------------------------------------- autotune cache


KEY = ac.make_key(90, "float16-ieee", "M1024-Ci64-Co64-k3x3-s1x1-d1x1-g1-plain", "vtest")
CFG = "m128n64k32g8w4s3"


def _valid_file(path):
    c = ac.AutotuneCache(path)
    c.put(KEY, CFG)
    assert ac.AutotuneCache(path).get(KEY) == CFG
    return path.read_bytes()


def _corruptions():
    """name -> fn(path, valid_bytes) that leaves a bad cache at path."""
    def garbage_bytes(p, good):
        g = torch.Generator().manual_seed(7)
        junk = torch.randint(0, 256, (512,), generator=g, dtype=torch.uint8).numpy().tobytes()
        p.write_bytes(b"\xff\xfe\x00" + junk)  # not UTF-8 either

    def truncated(p, good):
        p.write_bytes(good[: len(good) // 2])

    def empty(p, good):
        p.write_bytes(b"")

    def nul_bytes(p, good):
        p.write_bytes(b"\x00" * 64)

    def schema(obj):
        def f(p, good):
            p.write_text(json.dumps(obj))
        f.__name__ = "schema_" + type(obj).__name__
        return f

    def wrong_format(p, good):
        data = json.loads(good)
        data["format"] = data["format"] + 1
        p.write_text(json.dumps(data))

    def entries_not_a_dict(p, good):
        p.write_text(json.dumps({"format": json.loads(good)["format"], "entries": [[KEY, CFG]]}))

    def missing_entries(p, good):
        p.write_text(json.dumps({"format": json.loads(good)["format"]}))

    def directory(p, good):
        p.unlink()
        p.mkdir()

    return [garbage_bytes, truncated, empty, nul_bytes, schema([KEY, CFG]), schema("text"), schema(None),
            schema(3), wrong_format, entries_not_a_dict, missing_entries, directory]


@pytest.mark.parametrize("corrupt", _corruptions(), ids=lambda f: f.__name__)
def test_corrupt_autotune_cache_is_ignored_with_a_warning(tmp_path, corrupt):
    path = tmp_path / "autotune-vtest.json"
    good = _valid_file(path)
    corrupt(path, good)
    c = ac.AutotuneCache(path)
    with pytest.warns(RuntimeWarning, match="ignoring unreadable autotune cache"):
        assert c.get(KEY) is None
    # Warned once per cache object, not at every lookup.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert c.get(KEY) is None
        assert c.get(KEY + "-other") is None
    # Re-tuning stores a result; a file that cannot be replaced (the
    # directory case) is warned about and the result kept in memory.
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        c.put(KEY, CFG)
    assert c.get(KEY) == CFG
    if path.is_file():
        assert not rec, [str(w.message) for w in rec]
        assert ac.AutotuneCache(path).get(KEY) == CFG  # rewritten whole
    else:
        assert any("cannot write autotune cache" in str(w.message) for w in rec)
    assert not list(tmp_path.glob("*.tmp")), "a temporary file was left behind"


def test_unreadable_autotune_cache_permission(tmp_path):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("running as root: mode 000 does not stop reads")
    path = tmp_path / "autotune-vtest.json"
    _valid_file(path)
    path.chmod(0)
    try:
        with pytest.warns(RuntimeWarning, match="ignoring unreadable autotune cache"):
            assert ac.AutotuneCache(path).get(KEY) is None
    finally:
        path.chmod(0o600)


def test_corrupt_cache_through_choose_config(tmp_path, monkeypatch):
    """The launcher's autotune step with a corrupt file on disk: warns,
    re-tunes, and leaves a valid file behind."""
    pytest.importorskip("triton")
    from fused_resnet.backends.triton import conv_configs as cc
    from fused_resnet.backends.triton import launch
    from fused_resnet.backends.triton.conv2d_fwd import KERNEL_VERSION

    fused_resnet.set_cache_dir(tmp_path)
    monkeypatch.setattr(ac, "_caches", {})
    monkeypatch.setattr(launch, "_chosen", {})
    cands = cc.candidates(90, 2, 64)
    best = cands[len(cands) // 2]
    fused_resnet.set_autotune(True)  # tests/conftest.py turns it off
    monkeypatch.setattr(launch, "_benchmark", lambda run, cfg: 0.5 if cfg is best else 1.0)
    path = ac.get_cache(KERNEL_VERSION).path
    assert path.parent == tmp_path
    path.write_bytes(b'{"format": 1, "entries": {"sm90|fl')  # a writer killed mid-file
    key = ac.make_key(90, "float16-ieee", "bucket", KERNEL_VERSION)
    with pytest.warns(RuntimeWarning, match="ignoring unreadable autotune cache"):
        assert launch.choose_config(key, cands, None) == best
    assert json.loads(path.read_text())["entries"] == {key: best.name}


def test_concurrent_writers_never_expose_half_a_file(tmp_path):
    """Several cache objects (as several processes would have) tune and
    write the same file while readers parse it: every read sees a whole,
    valid file, and each writer keeps its own results."""
    path = tmp_path / "autotune-vtest.json"
    writers = 3
    per_writer = 25
    bad: list[str] = []
    done = threading.Event()

    def reader():
        while not done.is_set():
            try:
                data = json.loads(path.read_text())
            except FileNotFoundError:
                continue
            except Exception as exc:  # noqa: BLE001
                bad.append(f"{type(exc).__name__}: {exc}")
                return
            if data.get("format") != ac._FORMAT or not isinstance(data.get("entries"), dict):
                bad.append(f"bad schema: {data!r:.200}")
                return

    caches = [ac.AutotuneCache(path) for _ in range(writers)]

    def write(i):
        for k in range(per_writer):
            caches[i].put(f"w{i}-k{k}", f"cfg{i}-{k}")

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no writer may fail or see an unreadable file
            _run_threads(write, writers)
    finally:
        done.set()
        for t in readers:
            t.join(timeout=60)
    assert not bad, bad[:3]
    for i, c in enumerate(caches):
        for k in range(per_writer):
            assert c.get(f"w{i}-k{k}") == f"cfg{i}-{k}"
    on_disk = json.loads(path.read_text())["entries"]
    assert on_disk, "nothing was written"
    assert all(v == f"cfg{k[1]}-{k.split('-k')[1]}" for k, v in on_disk.items()), "an entry was mixed up"
    assert not list(tmp_path.glob("*.tmp")), "temporary files left behind"


def test_autotune_keys_differ_by_device_dtype_and_shape():
    from fused_resnet.backends.triton import conv_configs as cc

    archs = sorted({cc.arch_family(cap) for cap in [(8, 0), (8, 6), (8, 9), (9, 0)]})
    assert len(archs) >= 2, "sm80 and sm90 parts must not share tuned configs"
    dtypes = ["float16-ieee", "bfloat16-ieee", "float32-ieee", "float32-tf32"]
    problems = []
    for m in (1000, 4096, 100000):
        for c_in, c_out in ((64, 64), (64, 256), (256, 64)):
            for k, s, d in (((1, 1), (1, 1), (1, 1)), ((3, 3), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1)),
                            ((3, 3), (1, 1), (2, 2))):
                for groups in (1, 32):
                    for epi in ("plain", "res", "stats"):
                        problems.append((m, c_in, c_out, k[0], k[1], s, d, groups, epi))
    buckets = [cc.shape_bucket(*p) for p in problems]
    # Different problems (up to M's power-of-two rounding) get different buckets.
    rounded = {(1 << (p[0] - 1).bit_length(),) + p[1:] for p in problems}
    assert len(set(buckets)) == len(rounded)
    keys = {ac.make_key(a, dt, b, "v1") for a in archs for dt in dtypes for b in set(buckets)}
    assert len(keys) == len(archs) * len(dtypes) * len(set(buckets))
    assert ac.make_key(90, "float16-ieee", buckets[0], "v1") != ac.make_key(90, "float16-ieee", buckets[0], "v2")
    # The same problem always maps to the same key.
    assert cc.shape_bucket(*problems[5]) == buckets[5]


def test_autotune_cache_entries_are_per_key(tmp_path):
    from fused_resnet.backends.triton import conv_configs as cc

    path = tmp_path / "autotune-vtest.json"
    b = cc.shape_bucket(4096, 64, 64, 3, 3, (1, 1), (1, 1), 1, "plain")
    k80, k90 = ac.make_key(80, "float16-ieee", b, "v"), ac.make_key(90, "float16-ieee", b, "v")
    kbf = ac.make_key(90, "bfloat16-ieee", b, "v")
    c = ac.AutotuneCache(path)
    c.put(k90, CFG)
    fresh = ac.AutotuneCache(path)
    assert fresh.get(k90) == CFG
    assert fresh.get(k80) is None and fresh.get(kbf) is None


@pytest.mark.cuda
def test_launcher_keys_differ_on_gpu(tmp_path, monkeypatch):
    """On a GPU: the keys the Triton launcher builds for different dtypes and
    shapes are all different, and the same problem reuses its key."""
    pytest.importorskip("triton")
    from fused_resnet.backends.triton import launch

    fused_resnet.set_cache_dir(tmp_path)
    monkeypatch.setattr(ac, "_caches", {})
    seen = []
    real = launch.choose_config

    def spy(key, cands, run):
        seen.append(key)
        return real(key, cands, run)

    monkeypatch.setattr(launch, "choose_config", spy)
    dev = "cuda"
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for (n, c, hw, co) in ((2, 16, 8, 16), (2, 32, 8, 16), (4, 16, 16, 16)):
            x = torch.randn(n, c, hw, hw, device=dev, dtype=dtype)
            w = torch.randn(co, c, 3, 3, device=dev, dtype=dtype)
            launch.conv2d_bn_act(x, w, None, None, None, True, 1, 1, 1, 1, False)
    assert len(seen) == 9 and len(set(seen)) == 9, seen
    x = torch.randn(2, 16, 8, 8, device=dev, dtype=torch.float16)
    w = torch.randn(16, 16, 3, 3, device=dev, dtype=torch.float16)
    launch.conv2d_bn_act(x, w, None, None, None, True, 1, 1, 1, 1, False)
    assert seen[-1] == seen[0]
