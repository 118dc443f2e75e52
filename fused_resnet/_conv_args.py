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
