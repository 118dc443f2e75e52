"""Every private PyTorch and Triton API the package touches, in one place.

The package supports torch >= 2.11 and triton >= 3.6 (pyproject.toml), and
private APIs differ between those releases and today's. Each function here
wraps one of them and behaves the same on every supported release; CI runs
tests/build/test_compat.py on the oldest supported stack (`make test-oldest`) and
on the newest (`make test`). Nothing else in fused_resnet imports a private
torch or triton name.
"""

from __future__ import annotations

import functools

import torch

# ----------------------------------------------------------------- dynamo

# Marks a function whose answer torch.compile may fold to a constant at trace
# time (its tracer cannot follow dict lookups, lru_caches or the dispatcher).
assume_constant_result = torch._dynamo.assume_constant_result


def reset_compiled() -> None:
    """Forget every torch.compile'd graph (after changing a backend choice
    that compiled graphs folded in)."""
    torch._dynamo.reset()


def inductor_freezing():
    """Context manager: inductor compiles with freezing (weights folded as
    constants; read when a graph is compiled, i.e. on its first call)."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)


# ---------------------------------------------------------------- tensors


def bump_version(t: torch.Tensor) -> None:
    """Mark t as written in place (for a write autograd did not see: a
    kernel writing through a raw pointer)."""
    torch.autograd.graph.increment_version(t)


def version_counter(t: torch.Tensor) -> int:
    """t's version counter: bumped by every in-place write through PyTorch
    (optimizer steps, load_state_dict, edits under no_grad), so a cache keyed
    on it sees every such change."""
    return t._version


# ------------------------------------------------------------- dispatcher


def dispatcher_has_kernel(qualified_op: str, dispatch_key: str) -> bool:
    """True if the op (e.g. "fused_resnet::add_relu") has a kernel registered
    for the dispatch key ("CPU", "CUDA"); False for an unknown op."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualified_op, dispatch_key))
    except RuntimeError:
        return False


def below_autograd():
    """Context manager: ops called inside dispatch straight to their device
    kernels, skipping their autograd registrations (what torch.library's own
    autograd wrapper does inside an autograd.Function's forward/backward)."""
    return torch._C._AutoDispatchBelowAutograd()


# ------------------------------------------------------------------ torch.fx


def fx_symbolic_tracing() -> bool:
    """True inside torch.fx.symbolic_trace. torch >= 2.12 keeps a thread-local
    flag behind _get_is_fx_tracing(); torch 2.11 a module-level flag (its
    public is_fx_tracing() logs a deprecation warning on first use)."""
    from torch.fx import _symbolic_trace

    getter = getattr(_symbolic_trace, "_get_is_fx_tracing", None)
    if getter is not None:
        return bool(getter())
    return bool(getattr(_symbolic_trace, "_is_fx_tracing_flag", False))


# ---------------------------------------------------------------- nn.Module


def global_forward_hooks_registered() -> bool:
    """True while any global forward (pre-)hook is registered
    (torch.nn.modules.module.register_module_forward_hook and friends)."""
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


# ------------------------------------------------------ oneDNN (CPU convs)


def mkldnn_fused_conv_available() -> bool:
    """oneDNN's fused convolution ops (aten's private mkldnn namespace):
    conv + bias + post-op in one primitive, with prepacked weights."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"))


def mkldnn_inplace_binary_available() -> bool:
    """The form of the fused conv that accumulates into an existing tensor
    (oneDNN's sum post-op)."""
    return hasattr(torch.ops.mkldnn, "_convolution_pointwise_")


def mkldnn_prepack_weight(weight, padding, stride, dilation, groups, input_shape):
    """weight reordered into oneDNN's blocked layout for inputs of
    input_shape (valid for that shape only)."""
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight, list(padding), list(stride), list(dilation), groups, list(input_shape))


def mkldnn_conv(x, weight, bias, padding, stride, dilation, groups, unary: str | None):
    """unary(conv(x, weight) + bias), unary "relu" or None, one oneDNN primitive."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, bias, list(padding), list(stride), list(dilation), groups, unary or "none", [None], "")


def mkldnn_conv_add(x, other, weight, bias, padding, stride, dilation, groups, unary: str | None):
    """unary(conv(x, weight) + bias + other), one oneDNN primitive; `other` is
    not modified.

    torch 2.11's out-of-place binary form fails ("could not create a memory")
    whenever the output is 1x1 and the weight is prepacked, while its in-place
    form works. A 1x1 output is tiny, so for those the in-place form runs on a
    copy of `other`, on every release (one code path, the same primitive)."""
    args = (list(padding), list(stride), list(dilation), groups, "add", None, unary, [None], "")
    if other.shape[-2:] == (1, 1):
        out = other.clone()
        return mkldnn_conv_add_(out, x, weight, bias, padding, stride, dilation, groups, unary)
    return torch.ops.mkldnn._convolution_pointwise.binary(x, other, weight, bias, *args)


def mkldnn_conv_add_(other, x, weight, bias, padding, stride, dilation, groups, unary: str | None):
    """other = unary(conv(x, weight) + bias + other), written over `other`
    (oneDNN's sum post-op); returns other."""
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        other, x, weight, bias, list(padding), list(stride), list(dilation), groups, "add", None, unary,
        [None], "")


# ------------------------------------------------------------ torch.profiler


def profiler_cpu_memory_events(prof) -> list[tuple[int, int]] | None:
    """(start_ns, bytes) of every CPU allocator event a finished
    torch.profiler.profile(profile_memory=True) recorded (frees negative),
    in time order; None where the profiler's result layout is unknown."""
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:
        return None
    mem = [(e.start_ns(), e.nbytes()) for e in events
           if e.name() == "[memory]" and "CPU" in str(e.device_type())]
    return sorted(mem)


# ----------------------------------------------------------- Triton interpreter


@functools.lru_cache(maxsize=None)
def patch_triton_interpreter() -> bool:
    """Make Triton's interpreter (TRITON_INTERPRET=1) turn its scalar tensors
    into Python ints with NumPy >= 2.5.

    triton 3.6's interpreter defines tensor.__index__ as int(data), and a
    scalar there is often a shape-(1,) array, which NumPy >= 2.5 refuses to
    convert ("only 0-dimensional arrays can be converted to Python scalars").
    The interpreter sets __index__ afresh for every kernel it runs, inside a
    scope it builds with _patch_lang_tensor, so that builder is wrapped to
    set a size-1-safe __index__ after it. Returns whether it was patched
    (False when triton or its interpreter module is missing)."""
    try:
        from triton.runtime import interpreter
    except Exception:  # noqa: BLE001 - no triton, no interpreter to patch
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return False

    def index(self):  # what triton >= 3.7 does
        return int(self.handle.data.squeeze())

    @functools.wraps(original)
    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", index)

    interpreter._patch_lang_tensor = patched
    return True
