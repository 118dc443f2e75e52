"""fused_resnet._compat: each wrapper of a private torch/triton API behaves
the same on every supported release. CI runs this file on the newest stack
(`make test`) and the oldest (`make test-oldest`: torch 2.11, triton 3.6,
Python 3.12)."""

import glob
import importlib.machinery
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fused_resnet
from fused_resnet import _compat, dispatch

PACKAGE_DIR = os.path.dirname(fused_resnet.__file__)


def test_a_built_extension_loads():
    # A _C built for this interpreter that fails to load (a missing symbol,
    # e.g. NVRTC on torch 2.11) would otherwise only show up as every fused
    # backend quietly reported unavailable.
    built = [p for suffix in importlib.machinery.EXTENSION_SUFFIXES
             for p in glob.glob(os.path.join(PACKAGE_DIR, "_C" + suffix))]
    if not built:
        pytest.skip("fused_resnet._C is not built for this interpreter")
    assert dispatch.native_loaded(), f"{built[0]} exists but does not load: {dispatch.native_error()}"


def test_dispatcher_has_kernel():
    assert _compat.dispatcher_has_kernel("aten::add.Tensor", "CPU")
    assert not _compat.dispatcher_has_kernel("fused_resnet::no_such_op", "CPU")
    if dispatch.native_loaded():
        assert _compat.dispatcher_has_kernel("fused_resnet::add_relu", "CPU")


def test_below_autograd_skips_autograd():
    x = torch.randn(3, requires_grad=True)
    with _compat.below_autograd():
        y = torch.ops.aten.mul.Tensor(x, x)
    assert y.grad_fn is None
    assert torch.equal(y, x.detach() * x.detach())


def test_fx_symbolic_tracing_flag():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(_compat.fx_symbolic_tracing())
            return x + 1

    assert not _compat.fx_symbolic_tracing()
    torch.fx.symbolic_trace(Probe())
    assert seen == [True]
    assert not _compat.fx_symbolic_tracing()


def test_fx_symbolic_tracing_reads_either_flag(monkeypatch):
    """Both releases' spellings, on whichever stack runs this: torch 2.11's
    module-level flag where _get_is_fx_tracing is absent."""
    from torch.fx import _symbolic_trace

    monkeypatch.delattr(_symbolic_trace, "_get_is_fx_tracing", raising=False)
    monkeypatch.setattr(_symbolic_trace, "_is_fx_tracing_flag", False, raising=False)
    assert _compat.fx_symbolic_tracing() is False
    monkeypatch.setattr(_symbolic_trace, "_is_fx_tracing_flag", True, raising=False)
    assert _compat.fx_symbolic_tracing() is True


def test_global_forward_hooks_registered():
    assert not _compat.global_forward_hooks_registered()
    for register in (torch.nn.modules.module.register_module_forward_hook,
                     torch.nn.modules.module.register_module_forward_pre_hook):
        handle = register(lambda *args: None)
        try:
            assert _compat.global_forward_hooks_registered()
        finally:
            handle.remove()
        assert not _compat.global_forward_hooks_registered()


needs_mkldnn = pytest.mark.skipif(not _compat.mkldnn_fused_conv_available(), reason="no oneDNN fused convolution")


def _conv_case(out_hw: int, k: int = 3):
    # Padding 1 keeps a 3x3 conv's output at the input's size; out_hw 1 is the
    # shape torch 2.11's out-of-place binary form fails on.
    x = torch.randn(2, 16, out_hw, out_hw).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 16, k, k) * 0.1
    b = torch.randn(8)
    other = torch.randn(2, 8, out_hw, out_hw).contiguous(memory_format=torch.channels_last)
    return x, w, b, other, (k // 2, k // 2), (1, 1), (1, 1)


@needs_mkldnn
@pytest.mark.parametrize("out_hw", [1, 5])
@pytest.mark.parametrize("prepacked", [False, True])
def test_mkldnn_fused_convolutions_match_aten(out_hw, prepacked):
    x, w, b, other, padding, stride, dilation = _conv_case(out_hw)
    wp = _compat.mkldnn_prepack_weight(w, padding, stride, dilation, 1, x.shape) if prepacked else w
    z = F.conv2d(x, w, b, stride, padding, dilation)
    torch.testing.assert_close(_compat.mkldnn_conv(x, wp, b, padding, stride, dilation, 1, None), z)
    torch.testing.assert_close(_compat.mkldnn_conv(x, wp, b, padding, stride, dilation, 1, "relu"), z.relu())
    before = other.clone()
    y = _compat.mkldnn_conv_add(x, other, wp, b, padding, stride, dilation, 1, "relu")
    torch.testing.assert_close(y, (z + other).relu())
    assert torch.equal(other, before), "the out-of-place form must leave `other` alone"
    acc = other.clone()
    out = _compat.mkldnn_conv_add_(acc, x, wp, b, padding, stride, dilation, 1, None)
    assert out.data_ptr() == acc.data_ptr()
    torch.testing.assert_close(acc, z + other)


def test_profiler_cpu_memory_events():
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t = torch.empty(1 << 20)
        del t
    events = _compat.profiler_cpu_memory_events(prof)
    assert events is not None
    sizes = [n for _, n in events]
    assert (1 << 22) in sizes and -(1 << 22) in sizes, sizes
    assert [s for s, _ in events] == sorted(s for s, _ in events)


def test_inductor_freezing_and_reset():
    import torch._inductor.config as inductor_config

    before = inductor_config.freezing
    with _compat.inductor_freezing():
        assert inductor_config.freezing is True
    assert inductor_config.freezing == before
    _compat.reset_compiled()


def test_assume_constant_result_is_callable_eagerly():
    @_compat.assume_constant_result
    def answer() -> int:
        return 42

    assert answer() == 42


def test_triton_interpreter_index_takes_size_one_arrays():
    pytest.importorskip("triton")
    from triton.runtime import interpreter

    assert _compat.patch_triton_interpreter()

    class Scope:
        def __init__(self):
            self.attrs = {}

        def set_attr(self, obj, name, value):
            self.attrs[name] = value

    class Handle:
        data = np.array([7], dtype=np.int32)  # what the interpreter holds for a scalar

    class Scalar:
        handle = Handle()

    scope = Scope()
    interpreter._patch_lang_tensor(type("T", (), {}), scope)
    assert scope.attrs["__index__"](Scalar()) == 7


def test_triton_interpreter_runs_a_kernel_indexing_with_a_scalar(tmp_path):
    pytest.importorskip("triton")
    # A kernel whose loop bound is a loaded scalar: range() calls __index__
    # on a shape-(1,) array inside the interpreter.
    src = tmp_path / "kernel_probe.py"
    src.write_text(
        "import torch, triton, triton.language as tl\n"
        "import fused_resnet.backends.triton  # applies the interpreter fix\n"
        "@triton.jit\n"
        "def k(n_ptr, y_ptr):\n"
        "    n = tl.load(n_ptr)\n"
        "    acc = 0\n"
        "    for i in range(n):\n"
        "        acc += i\n"
        "    tl.store(y_ptr, acc)\n"
        "n = torch.tensor([5], dtype=torch.int32); y = torch.zeros(1, dtype=torch.int32)\n"
        "k[(1,)](n, y)\n"
        "print(int(y[0]))\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(src)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "10"
