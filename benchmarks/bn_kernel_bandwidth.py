"""GPU only: the fused BatchNorm + add + ReLU against eager at the ResNet-50
stage shapes (batch 256, bf16, channels_last), with the achieved bandwidth of
the fused passes and a CUDA-kernel profile of one fused training step.

    python benchmarks/bn_kernel_bandwidth.py [--profile-stage 2048]

Each figure is the median of 5 CUDA-event timings of 20 back-to-back calls.
GB/s counts the fused minimum bytes: forward 4 tensor passes + the 1-bit
mask; forward + backward 10 passes + 3 mask passes; bn_stats 1 pass;
bn_apply 3 passes + mask. The kernel profile gives each pass's own time:
the end-to-end figures at the small stages also hold host time (at
2048x7 a fused step took 0.67 ms for 0.37 ms of kernels). Gradient
accumulation into .grad (the vectorized_elementwise kernels) is paid by
eager alike. Results of 2026-11-23: benchmarks/results/2026-11-23-h100/.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from fused_resnet import ops
from fused_resnet.ops import batch_norm_act

STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]


def timeit(fn, iters=20, reps=5):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / iters)
    return sorted(ts)[len(ts) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--profile-stage", type=int, default=2048, help="channels of the stage to profile (0: none)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bn_kernel_bandwidth.py needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    dev, dt, n = "cuda", torch.bfloat16, args.batch
    cl = torch.channels_last
    for c, h in STAGES:
        z = torch.randn(n, c, h, h, device=dev).to(dt).to(memory_format=cl).requires_grad_()
        r = torch.randn(n, c, h, h, device=dev).to(dt).to(memory_format=cl).requires_grad_()
        dy = torch.randn_like(z)
        w = (torch.rand(c, device=dev) + 0.5).requires_grad_()
        b = (torch.randn(c, device=dev) * 0.1).requires_grad_()
        rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
        nbt = torch.zeros((), dtype=torch.long, device=dev)

        def eager():
            return torch.relu(F.batch_norm(z, rm, rv, w, b, True, 0.1, 1e-5) + r)

        def fused():
            return batch_norm_act(z, w, b, rm, rv, nbt, training=True, momentum=0.1, eps=1e-5, residual=r)

        e = z.numel() * z.element_size()
        m = z.numel() / 8
        with torch.no_grad():
            tef, tff = timeit(eager), timeit(fused)
        teb = timeit(lambda: eager().backward(dy))
        tfb = timeit(lambda: fused().backward(dy))
        sc, sh = torch.rand(c, device=dev), torch.rand(c, device=dev)
        tst = timeit(lambda: ops.bn_stats(z.detach()))
        tap = timeit(lambda: ops.bn_apply(z.detach(), sc, sh, r.detach(), True))

        def gbs(nbytes, ms):
            return nbytes / ms / 1e6

        print(f"{c}x{h}: fwd eager {tef:.3f} fused {tff:.3f} ms ({tef / tff:.2f}x, fused {gbs(4 * e + m, tff):.0f} GB/s) | "
              f"fwd+bwd eager {teb:.3f} fused {tfb:.3f} ms ({teb / tfb:.2f}x, fused {gbs(10 * e + 3 * m, tfb):.0f} GB/s) | "
              f"bn_stats {tst:.3f} ms {gbs(e, tst):.0f} GB/s | bn_apply {tap:.3f} ms {gbs(3 * e + m, tap):.0f} GB/s",
              flush=True)
        if c == args.profile_stage:
            from torch.profiler import ProfilerActivity, profile

            # CPU activity too: where the host time of a step goes (on the
            # H100 a 2048x7 step took 0.67 ms for 0.37 ms of kernels).
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                for _ in range(5):
                    fused().backward(dy)
                torch.cuda.synchronize()
            averages = p.key_averages()
            print(averages.table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
            print(averages.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
