"""Host (CPU) time per fused BatchNorm + add + ReLU call at a tiny shape,
where the kernels do almost nothing: what Python, autograd and the dispatcher
cost per call, fused against eager (F.batch_norm + add + relu).

    python benchmarks/bn_host_overhead.py [--device cuda]

On a GPU, host time is the likely reason the small ResNet stages leave the
GPU idle when the model runs eagerly (H100, 2048x7, batch 256: 0.37 ms of
kernels in 0.67 ms per fused forward + backward;
benchmarks/results/2026-11-23-h100/); --device cuda measures it there.
Medians of 7 rounds of 2000 calls, the four variants in alternation.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fused_resnet.ops import batch_norm_act


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dev, c = torch.device(args.device), 8
    cl = torch.channels_last
    z = torch.randn(2, c, 2, 2, device=dev).to(memory_format=cl).requires_grad_()
    r = torch.randn(2, c, 2, 2, device=dev).to(memory_format=cl).requires_grad_()
    w = torch.rand(c, device=dev).requires_grad_()
    b = torch.randn(c, device=dev).requires_grad_()
    rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
    nbt = torch.zeros((), dtype=torch.long, device=dev)
    dy = torch.randn_like(z)

    def fused():
        return batch_norm_act(z, w, b, rm, rv, nbt, training=True, momentum=0.1, eps=1e-5, residual=r)

    def eager():
        return torch.relu(F.batch_norm(z, rm, rv, w, b, True, 0.1, 1e-5) + r)

    def forward_only(f):
        def run():
            with torch.no_grad():
                f()
        return run

    variants = {"fused fwd+bwd": lambda: fused().backward(dy), "eager fwd+bwd": lambda: eager().backward(dy),
                "fused fwd": forward_only(fused), "eager fwd": forward_only(eager)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, f in variants.items():
            for _ in range(200):
                f()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.calls):
                f()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t) / args.calls * 1e6)
    for name, ts in times.items():
        print(f"{name:14s} {statistics.median(ts):7.1f} us per call")


if __name__ == "__main__":
    main()
