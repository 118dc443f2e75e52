"""torch.export and ONNX for fused models.

An exported fused model keeps our ops in its graph (fused_resnet::add_relu,
fused_resnet::batch_norm_act, ...): a consumer that loads fused_resnet runs
them as they are. For consumers that do not (ONNX, other runtimes, a plain
PyTorch install), `decompositions()` maps each of our ops to its definition in
standard aten ops (fused_resnet.ops.reference, the ground truth the kernels
are tested against), and `to_aten()` applies it to an ExportedProgram:

    ep = torch.export.export(fused_model.eval(), (x,))
    ep = fused_resnet.export.to_aten(ep)             # no fused_resnet ops left
    fused_resnet.export.export_onnx(fused_model.eval(), (x,), "model.onnx")

Ops that mutate their inputs (bn_finalize, the training-time running-stat
update) have no decomposition here: export training graphs through
torch.export's own functionalisation, or export in eval mode.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .ops import reference


def _batch_norm_act(z, weight, bias, residual, mean, invstd, scale, shift, relu, batch_stats, backend):
    # Its forward is bn_apply; the other inputs only route gradients.
    return reference.bn_apply(z, scale, shift, residual, relu, None)


def _bn_apply(z, scale, shift, residual, relu, out_dtype=None):
    return reference.bn_apply(z, scale, shift, residual, relu, out_dtype)


def _conv2d_bn_act(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups, emit_stats):
    return reference.conv2d_bn_act(x, weight, scale, shift, residual, relu, stride, padding, dilation, groups,
                                   emit_stats)


# op name -> its aten-level definition (same arguments, same outputs).
_DEFINITIONS: dict[str, Callable[..., Any]] = {
    "add_relu": reference.add_relu,
    "max_pool2d": reference.max_pool2d,
    "relu_mask": reference.relu_mask,
    "bn_stats": reference.bn_stats,
    "bn_apply": _bn_apply,
    "bn_backward": reference.bn_backward,
    "batch_norm_act": _batch_norm_act,
    "conv2d_bn_act": _conv2d_bn_act,
    "conv2d_bias_act_shortcut": reference.conv2d_bias_act_shortcut,
    "conv2d_prologue_bn_act": reference.conv2d_prologue_bn_act,
    "conv2d_dgrad_prologue": reference.conv2d_dgrad_prologue,
}


def decompositions() -> dict[torch._ops.OpOverload, Callable[..., Any]]:
    """{OpOverload: aten definition} for every registered fused_resnet op that
    has one; pass it to ExportedProgram.run_decompositions or to
    make_fx(decomposition_table=...)."""
    import fused_resnet.ops  # noqa: F401 - registers the Python custom ops

    table = {}
    for name, fn in _DEFINITIONS.items():
        packet = getattr(torch.ops.fused_resnet, name, None)
        if packet is None:
            continue  # not built/registered here (e.g. the native library did not load)
        for overload in packet.overloads():
            table[getattr(packet, overload)] = fn
    return table


def fused_ops_in(program: torch.export.ExportedProgram) -> list[str]:
    """Names of the fused_resnet ops that appear in an exported program."""
    found = []
    for node in program.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("fused_resnet."):
            found.append(str(node.target))
    return found


def to_aten(program: torch.export.ExportedProgram, core_aten: bool = False) -> torch.export.ExportedProgram:
    """The program with every fused_resnet op replaced by standard aten ops.

    core_aten=True also lowers the rest to the Core ATen opset (what most
    backends and torch.onnx expect); False leaves other ops as they are."""
    table = dict(torch.export.default_decompositions()) if core_aten else {}
    table.update(decompositions())
    lowered = program.run_decompositions(table)
    left = fused_ops_in(lowered)
    if left:
        raise RuntimeError(f"fused_resnet.export.to_aten: no decomposition for {sorted(set(left))}")
    return lowered


def export_onnx(model: torch.nn.Module, args: tuple, path: str | None = None, **onnx_kwargs: Any):
    """Export `model(*args)` to ONNX through torch.export and to_aten (so the
    ONNX graph holds standard operators only). Needs the `onnx` and
    `onnxscript` packages (pip install fused_resnet[test]). Returns
    torch.onnx's ONNXProgram; writes it to `path` when given."""
    program = to_aten(torch.export.export(model, tuple(args)), core_aten=True)
    onnx_program = torch.onnx.export(program, tuple(args), dynamo=True, **onnx_kwargs)
    if path is not None:
        onnx_program.save(path)
    return onnx_program
