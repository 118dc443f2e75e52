"""Convolution argument helpers shared by every conv op (Triton, cuDNN) and
its launcher: one normalisation of stride/padding/dilation, one output-size
formula (aten's), one error text."""

from __future__ import annotations


def pair(v, what: str, op: str) -> list[int]:
    """An int or a 1- or 2-sequence of ints as [h, w]; anything else is a
    ValueError naming `op` and the argument `what`."""
    if isinstance(v, int):
        return [v, v]
    t = [int(e) for e in v]
    if len(t) == 1:
        t = t * 2
    if len(t) != 2:
        raise ValueError(f"{op}: `{what}` must be an int or a pair of ints, got {v!r}")
    return t


def out_hw(x_shape, w_shape, stride, padding, dilation) -> tuple[int, int]:
    """(OH, OW) of conv2d over an (N, C, H, W) input with a (K, C/g, KH, KW) weight."""
    oh, ow = (
        (x_shape[2 + d] + 2 * padding[d] - dilation[d] * (w_shape[2 + d] - 1) - 1) // stride[d] + 1
        for d in range(2)
    )
    return oh, ow


def check_groups(c_in: int, weight_shape, groups: int, op: str, x_name: str = "x") -> None:
    """`weight` (C_out, C_in / groups, KH, KW) must fit an input `x_name` of
    c_in channels with `groups` groups; ValueError naming `op` otherwise."""
    c_out, cin_g = weight_shape[0], weight_shape[1]
    if groups < 1 or c_in % groups or c_out % groups or cin_g != c_in // groups:
        raise ValueError(f"{op}: `weight` {tuple(weight_shape)} does not match `{x_name}` with {c_in} channels "
                         f"and groups={groups} (expected ({c_out}, {c_in // max(groups, 1)}, KH, KW) with "
                         f"channels divisible by groups)")


def check_channel_vectors(vectors: dict, count: int, per: str, op: str) -> None:
    """Every tensor of `vectors` (name -> tensor or None) has `count`
    elements, one per `per`; ValueError naming `op` and the argument."""
    for what, v in vectors.items():
        if v is not None and v.numel() != count:
            raise ValueError(f"{op}: `{what}` must have {count} elements (one per {per}), got {v.numel()}")


def check_shortcut(x, x2, weight2, stride2, out_shape, op: str) -> tuple[int, int]:
    """Validate a projection shortcut conv1x1(x2, weight2, stride2, no
    padding, one group) whose result is added to an output of `out_shape`
    (N, C_out, OH, OW) computed from `x`. Returns stride2 as (h, w); raises
    ValueError/TypeError naming the argument otherwise."""
    s2 = pair(stride2, "stride2", op)
    if s2[0] < 1 or s2[1] < 1:
        raise ValueError(f"{op}: `stride2` must be positive, got {s2}")
    if x2.dim() != 4 or weight2.dim() != 4:
        raise ValueError(f"{op}: `x2` and `weight2` must be 4-D, got shapes {list(x2.shape)} and "
                         f"{list(weight2.shape)}")
    for what, t in (("x2", x2), ("weight2", weight2)):
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: `{what}` has dtype {t.dtype} but `x` has {x.dtype}; expected the same")
        if t.device != x.device:
            raise ValueError(f"{op}: `{what}` is on {t.device} but `x` is on {x.device}; expected the same")
    n, c_out, oh, ow = (int(v) for v in out_shape)
    n2, c2, h2, w2 = (int(v) for v in x2.shape)
    if tuple(weight2.shape) != (c_out, c2, 1, 1):
        raise ValueError(f"{op}: `weight2` must be a 1x1 conv weight {[c_out, c2, 1, 1]} (C_out outputs, "
                         f"x2's {c2} channels), got {list(weight2.shape)}")
    got = [n2, c_out, (h2 - 1) // s2[0] + 1, (w2 - 1) // s2[1] + 1]
    if got != [n, c_out, oh, ow]:
        raise ValueError(f"{op}: the shortcut of `x2` {list(x2.shape)} with stride {s2} has shape {got}, "
                         f"expected the output's {[n, c_out, oh, ow]}")
    return s2[0], s2[1]
