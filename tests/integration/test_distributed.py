"""DistributedDataParallel over a fused model: 2 CPU processes on Gloo
(loopback). Each rank trains the fused model and torchvision's eager model
under DDP on its own shard; the all-reduced gradients and the updated
running statistics of the two must agree (numerics criterion, against an
fp64 eager DDP run). Synchronised BatchNorm: tests/nn/test_sync_batchnorm.py."""

import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, tests_dir, result_dir):
    sys.path.insert(0, tests_dir)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from helpers import make_trio
        from torch.nn.parallel import DistributedDataParallel as DDP

        models = [DDP(m.train()) for m in make_trio("resnet18")]
        gen = torch.Generator().manual_seed(1234)
        x = torch.randn(WORLD * 2, 3, 16, 16, generator=gen)[rank * 2:(rank + 1) * 2]
        g = torch.randn(WORLD * 2, 10, generator=gen, dtype=torch.float64)[rank * 2:(rank + 1) * 2]
        for m in models:
            dtype = next(m.parameters()).dtype
            m(x.to(dtype)).backward(g.to(dtype))
        if rank == 0:
            torch.save([{"grads": {n: p.grad for n, p in m.module.named_parameters()},
                         "buffers": dict(m.module.named_buffers())} for m in models],
                       os.path.join(result_dir, "rank0.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_over_fused_model_matches_eager_ddp(tmp_path):
    from fused_resnet import numerics

    tests_dir = str(Path(__file__).resolve().parent.parent)  # tests/, where helpers.py is
    mp.spawn(_worker, args=(_free_port(), tests_dir, str(tmp_path)), nprocs=WORLD, join=True)
    fused, eager, ref = torch.load(tmp_path / "rank0.pt")
    names = list(fused["grads"])
    v = numerics.compare_normwise([fused["grads"][n] for n in names], [eager["grads"][n] for n in names],
                                  [ref["grads"][n] for n in names])
    assert v.ok, f"DDP gradients outside the criterion: {v}"
    for n, b in fused["buffers"].items():
        if n.endswith("num_batches_tracked"):
            assert torch.equal(b, eager["buffers"][n]), n
        else:
            numerics.assert_close_to_reference(b, eager["buffers"][n], ref["buffers"][n], what=f"DDP buffer {n}")
