"""The workload `make gpu-check` runs under compute-sanitizer's memcheck:
every CUDA BatchNorm kernel (statistics, finalize, apply with residual and
ReLU, its mask, both backward passes) and add_relu, once each, at small
shapes whose sizes are not multiples of the vector width or the block, in
both layouts and in fp32 and bf16, through the fused unit the blocks use.

    compute-sanitizer --tool memcheck --error-exitcode 3 \\
        python -m fused_resnet.tools.gpu_check.memcheck --device cuda

With --device cpu it runs the same calls on the CPU backend (the CPU
rehearsal), which checks that the script itself works.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

# (N, C, H, W): odd sizes, a channel count that is not a multiple of the
# vector width, and enough values per channel for a batch statistic.
SHAPES = [(2, 7, 5, 3), (3, 16, 9, 9), (4, 33, 2, 5)]


def run(device: str) -> int:
    from ...nn.paths.units import unit
    from ...ops import add_relu

    backend = "cuda" if torch.device(device).type == "cuda" else "cpu"
    calls = 0
    for dtype in (torch.float32, torch.bfloat16):
        for n, c, h, w in SHAPES:
            for fmt in (torch.contiguous_format, torch.channels_last):
                conv = nn.Conv2d(c, c, 1, bias=False).to(device=device, dtype=dtype, memory_format=fmt)
                bn = nn.BatchNorm2d(c).to(device=device, dtype=dtype)
                x = torch.randn(n, c, h, w, device=device, dtype=dtype).contiguous(memory_format=fmt)
                res = torch.randn_like(x)
                for train in (True, False):
                    bn.train(train)
                    xi = x.detach().requires_grad_(train)
                    ri = res.detach().requires_grad_(train)
                    y = unit(conv, bn, xi, ri, True, backend)
                    if train:
                        y.backward(torch.randn_like(y))
                    calls += 1
                y = add_relu(x, res, backend=backend)
                calls += 1
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    print(f"memcheck workload: {calls} fused calls on {device} ({backend} backend) done", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fused_resnet.tools.gpu_check.memcheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    args = ap.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("memcheck: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    return run(args.device)


if __name__ == "__main__":
    raise SystemExit(main())
