"""fused_resnet.optimize(): prepare a model for inference at one input shape.

    model = fused_resnet.optimize(model, example_input)            # in place, returns the model
    with torch.no_grad():
        y = model(x)
    graphed = fused_resnet.optimize(model, x_cuda, cuda_graph=True)  # CUDA: replays a captured graph
    y = graphed(x_cuda)

Steps: swap torchvision/timm blocks for fused ones (convert(), in place) if
the model still has any; apply `backend`; eval mode; channels_last where it
is the fast layout (CUDA; CPU with oneDNN); then one forward of the example
under torch.no_grad(), which folds every BN into its conv (filling the
version-keyed fold caches, including the combined fold of the projection
shortcut GEMM), prepacks oneDNN's weights on CPU and, on a GPU, selects the
Triton kernels' tile configs (autotuning on first sight of a shape bucket,
cached on disk). With cuda_graph=True the forward is then warmed on a side
stream and captured in a CUDA graph; the returned CUDAGraphModule copies each
input into the captured input buffer and replays.

The fold caches are used only where autograd need not see the folds: run
the prepared model under torch.no_grad() or torch.inference_mode() (the
graph wrapper does so itself).
"""

from __future__ import annotations

import torch
from torch import nn

from . import _compat, dispatch

__all__ = ["optimize", "CUDAGraphModule"]


def _fast_memory_format(x: torch.Tensor) -> torch.memory_format | None:
    """channels_last where the fused convolutions read NHWC natively: every
    CUDA backend (cuDNN, the Triton conv), and oneDNN on CPU (float32/16-bit;
    not float64, which oneDNN does not run)."""
    if x.dim() != 4:
        return None
    if x.device.type == "cuda":
        return torch.channels_last
    if x.device.type == "cpu" and torch.backends.mkldnn.is_available() and x.dtype != torch.float64:
        return torch.channels_last
    return None


def _has_unconverted_blocks(model: nn.Module) -> bool:
    """Whether convert() would fuse something still unfused in `model`."""
    from .nn.convert import convertible

    return any(convertible(m) for m in model.modules())


def _tensor_state(model: nn.Module) -> tuple:
    """Identity and version of every parameter and buffer: what a captured
    graph (and the folds it read) depends on."""
    return tuple((t.data_ptr(), _compat.version_counter(t)) for t in list(model.parameters()) + list(model.buffers()))


class CUDAGraphModule(nn.Module):
    """A model's inference forward captured in a CUDA graph for one input
    shape, dtype and device (made by optimize(..., cuda_graph=True)).

    Calling it copies the input into the captured input buffer and replays
    the graph. The returned tensor is the graph's static output buffer (as
    with torch.cuda.make_graphed_callables): the next call overwrites it, so
    clone() what you keep. An input of another shape, dtype or device, a
    model switched to training mode, or parameters/buffers changed since the
    capture (the graph holds the folds made from them) raise an error: call
    optimize() again. `module` is the prepared model itself.
    """

    def __init__(self, module: nn.Module, example: torch.Tensor, warmup: int = 3):
        super().__init__()
        if example.device.type != "cuda":
            raise ValueError(f"CUDAGraphModule: the example input must be a CUDA tensor, got {example.device}")
        self.module = module
        self.static_input = example.detach().clone()
        with torch.no_grad():
            # Warm-up on a side stream, as torch.cuda.graph requires; it also
            # finishes any autotuning and fills the fold caches.
            side = torch.cuda.Stream(device=example.device)
            side.wait_stream(torch.cuda.current_stream(example.device))
            with torch.cuda.stream(side):
                for _ in range(max(1, warmup)):
                    module(self.static_input)
            torch.cuda.current_stream(example.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_output = module(self.static_input)
        torch.cuda.synchronize(example.device)
        self._state = _tensor_state(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.static_input
        if x.shape != s.shape or x.dtype != s.dtype or x.device != s.device:
            raise ValueError(
                f"fused_resnet.optimize: this CUDA graph was captured for input shape {tuple(s.shape)}, "
                f"{s.dtype} on {s.device}; got {tuple(x.shape)}, {x.dtype} on {x.device}. "
                "Call fused_resnet.optimize() again with an example of the new shape, or run `.module` directly.")
        if self.module.training:
            raise RuntimeError("fused_resnet.optimize: the CUDA graph holds the eval-mode forward, but the model "
                               "is in training mode; call .eval() (or run `.module` directly)")
        if _tensor_state(self.module) != self._state:
            raise RuntimeError("fused_resnet.optimize: the model's parameters or buffers changed since the CUDA "
                               "graph was captured (it replays the folds made from the old ones); call "
                               "fused_resnet.optimize() again")
        s.copy_(x)
        self.graph.replay()
        return self.static_output


def optimize(model: nn.Module, example_input: torch.Tensor, *, backend: str | None = None,
             cuda_graph: bool = False) -> nn.Module:
    """Prepare `model` for inference on inputs shaped like `example_input`.

    In place: torchvision (or timm) BasicBlock/Bottleneck modules still in the
    model are swapped for fused ones (as convert() does); `backend`, if given,
    is set on the model (as model.set_backend / convert(model, backend));
    the model goes to eval mode and, where it is the fast layout (CUDA, and
    CPU with oneDNN), to channels_last; one forward of the example (converted
    the same way) under torch.no_grad() then folds every BN (filling the fold
    caches), prepacks oneDNN's weights on CPU, and selects/autotunes the
    Triton kernels on a GPU. Outputs are those of the unprepared model in
    eval mode, within the numerics criterion (fused_resnet.numerics).

    Args:
        model: a fused ResNet, a model with fused or torchvision blocks, or a
            single block.
        example_input: a tensor of the shape, dtype and device to serve.
        backend: None (keep the model's choice) or a backend name.
        cuda_graph: CUDA inputs only: capture the forward in a CUDA graph and
            return a CUDAGraphModule replaying it for inputs of the example's
            shape (copied into a static buffer; another shape raises).

    Returns the prepared model (the same object, except that a bare
    torchvision block is returned as its fused twin), or the CUDAGraphModule.
    Run it under torch.no_grad() or torch.inference_mode(): with autograd
    recording, the folds are recomputed on every call.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize() expects an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"optimize(): `example_input` must be a tensor, got {type(example_input).__name__}")
    if not example_input.is_floating_point():
        raise TypeError(f"optimize(): `example_input` must be a floating-point tensor, got {example_input.dtype}")
    if cuda_graph and example_input.device.type != "cuda":
        raise ValueError(f"optimize(cuda_graph=True) needs a CUDA example input; got one on "
                         f"{example_input.device} (CUDA graphs exist only on CUDA devices)")
    if backend is not None:
        backend = dispatch.validate(backend)
    if backend is not None or _has_unconverted_blocks(model):
        from .nn.convert import convert

        model = convert(model, backend=backend)
    model.eval()
    x = example_input.detach()
    fmt = _fast_memory_format(x)
    if fmt is not None:
        model.to(memory_format=fmt)
        x = x.contiguous(memory_format=fmt)
    if cuda_graph:
        return CUDAGraphModule(model, x)
    with torch.no_grad():
        model(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return model
