"""What the CPU backend's NaN guard costs in inference: fused-cpu resnet50
with the guard (activations bounded, measured by sqrt(sum x^2) where the
bounds carried from unit to unit grow too loose, before the oneDNN ReLU
post-op may be used; fused_resnet/backends/cpu/finite_bounds.py) against the same
model with every measurement replaced by a constant 0 (the post-op always
fused, as before the guard: NaN then vanishes).

    python benchmarks/nan_guard_cost.py [--batch-size 8] [--image-size 224] [--rounds 9] [--threads N]

Both variants run in one process, alternating one forward each per round
after two warm-up forwards, so drift of the machine's speed hits both
alike; medians of --rounds forwards, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fused_resnet
from fused_resnet.backends.cpu import finite_bounds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = fused_resnet.MODEL_BUILDERS[args.model](backend="cpu").eval().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size).contiguous(
        memory_format=torch.channels_last)
    measure = finite_bounds.measure
    calls = [0]

    def counted(t):
        calls[0] += 1
        return measure(t)

    def run(guard: bool) -> float:
        finite_bounds.measure = counted if guard else (lambda t: 0.0)
        finite_bounds.forget()  # each forward starts afresh, as with a new batch
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                model(x)
            return time.perf_counter() - t0
        finally:
            finite_bounds.measure = measure

    for _ in range(2):
        run(True), run(False)
    calls[0] = 0
    times = {True: [], False: []}
    for _ in range(args.rounds):
        for guard in (True, False):
            times[guard].append(run(guard))
    with_guard, without = statistics.median(times[True]), statistics.median(times[False])
    print(f"{args.model} batch {args.batch_size} {args.image_size}x{args.image_size} fp32 channels_last, "
          f"{torch.get_num_threads()} threads, medians of {args.rounds} forwards")
    print(f"guard on  {with_guard * 1e3:8.1f} ms   ({calls[0] // args.rounds} measured tensors per forward)")
    print(f"guard off {without * 1e3:8.1f} ms")
    print(f"cost      {(with_guard / without - 1) * 100:+.1f} %")


if __name__ == "__main__":
    main()
