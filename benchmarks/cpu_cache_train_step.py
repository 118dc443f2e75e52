"""resnet50 training steps on the CPU with the CPU output cache at a given
limit: seconds per step, page faults per step, peak live tensor memory,
bytes left in the cache, peak RSS.

    FUSED_RESNET_CPU_CACHE_MB=0   python benchmarks/cpu_cache_train_step.py
    FUSED_RESNET_CPU_CACHE_MB=256 python benchmarks/cpu_cache_train_step.py

One setting per process: the process allocator's state (glibc's dynamic mmap
threshold) depends on everything freed before, so settings must not share one.
"""

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F

import fused_resnet
from fused_resnet.tools.bench.timing import peak_memory_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    cl = torch.channels_last
    model = fused_resnet.resnet50().to(memory_format=cl)
    x = torch.randn(args.batch, 3, 224, 224).to(memory_format=cl)
    target = torch.randint(0, 1000, (args.batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        opt.step()

    for _ in range(2):
        step()
    fused_resnet.reset_cpu_cache_counters()
    times = []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / args.steps
    peak = peak_memory_bytes(step, "cpu")
    st = fused_resnet.cpu_cache_stats()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"cache limit {st['limit'] / 2**20:.0f} MiB: {statistics.median(times):.3f} s/step (median of {args.steps}), "
          f"{faults:.0f} page faults/step, peak live tensors {peak / 2**20:.1f} MiB, "
          f"cached {st['cached_bytes'] / 2**20:.1f} MiB, hits {st['hits']}, misses {st['misses']}, "
          f"evictions {st['evictions']}, peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
