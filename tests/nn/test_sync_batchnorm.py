"""Synchronised BatchNorm (fused_resnet.convert_sync_batchnorm) on 2 CPU
processes over Gloo (loopback), with uneven batches (3 and 2 samples).

The synchronised fused run must equal ONE process running the same fused
model on the concatenated batch: logits, input gradients, summed parameter
gradients, running statistics and num_batches_tracked. In fp64 that equality
is tight (only the summation order differs); in fp32 under
DistributedDataParallel it is checked with the numerics criterion against
torchvision's eager model on the concatenated batch and an fp64 reference.
Each forward and backward of a BN must cost exactly one collective.

nn.SyncBatchNorm itself refuses CPU tensors, so the comparison with it runs
only where two GPUs are present (test at the end).
"""

import copy
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fused_resnet
from fused_resnet import numerics

WORLD = 2
SPLIT = (3, 2)  # uneven per-rank batch sizes
N_BN_RESNET18 = 20  # stem + 2 per basic block x 8 + 3 downsample BNs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(dtype):
    gen = torch.Generator().manual_seed(1234)
    # 64x64: layer4 sees 2x2 maps, 20 values per channel over both ranks
    # (helpers.MIN_BN_VALUES). With 5 (at 32x32), a pre-activation within
    # fp32 rounding of zero (a ReLU tie: two correct fp32 results take
    # different sides) moved the fp32 gradients' normwise error by 20x
    # eager's when an unrelated change moved the statistics by 1 ulp.
    x = torch.randn(sum(SPLIT), 3, 64, 64, generator=gen, dtype=torch.float64)
    g = torch.randn(sum(SPLIT), 10, generator=gen, dtype=torch.float64)
    return x.to(dtype), g.to(dtype)


def _shard(t, rank):
    start = sum(SPLIT[:rank])
    return t[start:start + SPLIT[rank]]


def _model(dtype, momentum="default", channels_last=False):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: helpers.py
    from helpers import randomise_bn

    torch.manual_seed(0)
    m = fused_resnet.resnet18(num_classes=10)
    randomise_bn(m)
    if momentum != "default":
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.momentum = momentum
    m = m.to(dtype)
    return m.to(memory_format=torch.channels_last) if channels_last else m


# Scenarios run in the workers: (name, dtype, backend, momentum, channels_last, ddp).
SCENARIOS = [
    ("fp64-cpu", torch.float64, "cpu", "default", False, False),
    ("fp64-reference", torch.float64, "reference", "default", False, False),
    ("fp64-cpu-cumulative-cl", torch.float64, "cpu", None, True, False),
    ("fp32-cpu-ddp", torch.float32, "cpu", "default", True, True),
]


class _Counter:
    """Counts torch.distributed.all_reduce calls (the sync BN's collectives;
    DDP's gradient buckets go through its C++ reducer, not this function)."""

    def __init__(self):
        self.calls = 0
        self._orig = dist.all_reduce

    def __enter__(self):
        def counting(*a, **k):
            self.calls += 1
            return self._orig(*a, **k)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def _worker(rank, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        results = {}
        for name, dtype, backend, momentum, cl, ddp in SCENARIOS:
            model = fused_resnet.convert_sync_batchnorm(_model(dtype, momentum, cl)).train()
            model.set_backend(backend)
            net = DDP(model) if ddp else model
            x, g = _data(dtype)
            x = _shard(x, rank).clone().requires_grad_(True)
            if cl:
                x = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
            with _Counter() as fwd:
                y = net(x)
            with _Counter() as bwd:
                y.backward(_shard(g, rank))
            grads = {}
            for n, p in model.named_parameters():
                gp = p.grad.clone()
                if ddp:
                    gp *= WORLD  # DDP averages; the single process sums
                else:
                    dist.all_reduce(gp)
                grads[n] = gp
            results[name] = {
                "y": y.detach(), "dx": x.grad, "grads": grads,
                "buffers": {n: b.clone() for n, b in model.named_buffers()},
                "collectives": (fwd.calls, bwd.calls),
            }
        results["standalone"] = _standalone_bns(rank)
        torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# A SyncBatchNorm2d on its own (its module forward, not a fused block), with
# all of the batch on rank 0 and none on rank 1, tracking or not.
STANDALONE_SPLIT = (5, 0)


def _standalone_inputs():
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(sum(STANDALONE_SPLIT), 6, 4, 3, generator=gen, dtype=torch.float64) * 3 + 100
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return x, g


def _standalone_bn(sync, track):
    cls = fused_resnet.SyncBatchNorm2d if sync else torch.nn.BatchNorm2d
    bn = cls(6, momentum=None, track_running_stats=track).double().train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
        bn.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(4))
    return bn


def _standalone_bns(rank):
    x, g = _standalone_inputs()
    start = sum(STANDALONE_SPLIT[:rank])
    xs = x[start:start + STANDALONE_SPLIT[rank]].clone().requires_grad_(True)
    gs = g[start:start + STANDALONE_SPLIT[rank]]
    out = {}
    for track in (True, False):
        bn = _standalone_bn(True, track)
        y = bn(xs)
        y.backward(gs)
        wg, bg = bn.weight.grad.clone(), bn.bias.grad.clone()
        dist.all_reduce(wg)
        dist.all_reduce(bg)
        out[track] = (y.detach(), xs.grad.clone(), wg, bg, {n: b.clone() for n, b in bn.named_buffers()})
        xs.grad = None
    return out


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("syncbn")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _single_process(model, dtype, channels_last=False):
    x, g = _data(dtype)
    x = x.clone()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = model.train()(x)
    y.backward(g)
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}, dict(model.named_buffers())


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s[1] == torch.float64], ids=lambda s: s[0])
def test_sync_bn_equals_one_process_on_the_concatenated_batch(distributed_results, scenario):
    name, dtype, backend, momentum, cl, _ = scenario
    model = _model(dtype, momentum, cl).set_backend(backend)
    y, dx, grads, buffers = _single_process(model, dtype, cl)
    ranks = [r[name] for r in distributed_results]
    tight = dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y, **tight)
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), dx, **tight)
    for r in ranks:
        for n, gp in grads.items():
            torch.testing.assert_close(r["grads"][n], gp, **tight, msg=lambda m: f"{name} grad {n}: {m}")
        for n, b in buffers.items():
            if n.endswith("num_batches_tracked"):
                assert torch.equal(r["buffers"][n], b), n
            else:
                torch.testing.assert_close(r["buffers"][n], b, **tight, msg=lambda m: f"{name} buffer {n}: {m}")


def test_sync_bn_under_ddp_fp32_within_the_numerics_criterion(distributed_results):
    import torchvision

    name = "fp32-cpu-ddp"
    ranks = [r[name] for r in distributed_results]
    torch.manual_seed(0)
    eager = torchvision.models.resnet18(num_classes=10)
    eager.load_state_dict(_model(torch.float32).state_dict())
    eager = eager.to(memory_format=torch.channels_last)
    ref = copy.deepcopy(eager).double()
    ye, dxe, ge, be = _single_process(eager, torch.float32, channels_last=True)
    yr, dxr, gr, br = _single_process(ref, torch.float64)
    numerics.assert_close_to_reference(torch.cat([r["y"] for r in ranks]), ye, yr, what="sync BN logits")
    v = numerics.compare_normwise([torch.cat([r["dx"] for r in ranks])], [dxe], [dxr])
    assert v.ok, f"sync BN input gradient: {v}"
    names = list(ge)
    for r in ranks:
        v = numerics.compare_normwise([r["grads"][n] for n in names], [ge[n] for n in names],
                                      [gr[n] for n in names])
        assert v.ok, f"sync BN parameter gradients under DDP: {v}"
        for n in be:
            if n.endswith("num_batches_tracked"):
                assert torch.equal(r["buffers"][n], be[n]), n
            else:
                numerics.assert_close_to_reference(r["buffers"][n], be[n], br[n], what=f"sync BN buffer {n}")


@pytest.mark.parametrize("track", [True, False])
def test_standalone_sync_bn_with_an_empty_rank(distributed_results, track):
    """nn.BatchNorm2d on the whole batch (large mean, small spread, momentum
    None) vs SyncBatchNorm2d with every sample on rank 0 and none on rank 1."""
    x, g = _standalone_inputs()
    bn = _standalone_bn(False, track)
    xr = x.clone().requires_grad_(True)
    y = bn(xr)
    y.backward(g)
    tight = dict(rtol=1e-9, atol=1e-10)
    y0, dx0, wg0, bg0, buf0 = distributed_results[0]["standalone"][track]
    y1, dx1, wg1, bg1, buf1 = distributed_results[1]["standalone"][track]
    assert y1.shape[0] == 0 and dx1.shape[0] == 0
    torch.testing.assert_close(y0, y.detach(), **tight)
    torch.testing.assert_close(dx0, xr.grad, **tight)
    for wg, bg, buf in ((wg0, bg0, buf0), (wg1, bg1, buf1)):
        torch.testing.assert_close(wg, bn.weight.grad, **tight)
        torch.testing.assert_close(bg, bn.bias.grad, **tight)
        for n, b in bn.named_buffers():
            if n == "num_batches_tracked":
                assert torch.equal(buf[n], b)
            else:
                torch.testing.assert_close(buf[n], b, **tight)


def test_one_collective_per_bn_forward_and_backward(distributed_results):
    for r in distributed_results:
        for name, res in r.items():
            if name == "standalone":
                continue
            assert res["collectives"] == (N_BN_RESNET18, N_BN_RESNET18), (name, res["collectives"])


def test_convert_sync_batchnorm_shares_parameters_and_keeps_mode():
    model = fused_resnet.resnet18(num_classes=10).eval()
    before = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = fused_resnet.convert_sync_batchnorm(model, process_group=None)
    assert out is model
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == N_BN_RESNET18 and all(isinstance(m, fused_resnet.SyncBatchNorm2d) for m in bns)
    assert all(not m.training for m in bns)
    for n, p in model.named_parameters():
        assert p is before[n], n
    for n, b in model.named_buffers():
        assert b is buffers[n], n
    assert set(model.state_dict()) == set(fused_resnet.resnet18(num_classes=10).state_dict())
    assert opt.param_groups[0]["params"][0] is model.conv1.weight
    # A bare BN converts to a module that is returned.
    bn = torch.nn.BatchNorm2d(4)
    assert isinstance(fused_resnet.convert_sync_batchnorm(bn), fused_resnet.SyncBatchNorm2d)


def test_without_a_process_group_it_is_batchnorm2d():
    # Not initialised: training runs the plain fused path, bit for bit.
    assert not dist.is_initialized()
    a = _model(torch.float64)
    b = fused_resnet.convert_sync_batchnorm(_model(torch.float64))
    x, g = _data(torch.float64)
    ya = a.train()(x)
    yb = b.train()(x)
    assert torch.equal(ya, yb)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fused_resnet.ops.sync_batch_norm_act(x, None, None, None, None, None, momentum=0.1, eps=1e-5)


def _gpu_worker(rank, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        bn_fused = fused_resnet.SyncBatchNorm2d(8).cuda().train()
        bn_torch = torch.nn.SyncBatchNorm(8).cuda().train()
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(sum(SPLIT), 8, 5, 5, generator=gen)
        g = torch.randn(sum(SPLIT), 8, 5, 5, generator=gen)
        xs, gs = _shard(x, rank).cuda(), _shard(g, rank).cuda()
        out = {}
        for key, bn in (("fused", bn_fused), ("torch", bn_torch)):
            xi = xs.clone().requires_grad_(True)
            y = bn(xi)
            y.backward(gs)
            out[key] = [y.cpu(), xi.grad.cpu(), bn.weight.grad.cpu(), bn.running_mean.cpu(), bn.running_var.cpu()]
        torch.save(out, os.path.join(result_dir, f"gpu{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nn.SyncBatchNorm needs CUDA; NCCL needs 2 GPUs")
def test_matches_nn_syncbatchnorm_on_two_gpus(tmp_path):
    mp.spawn(_gpu_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for r in range(WORLD):
        out = torch.load(tmp_path / f"gpu{r}.pt")
        for a, b in zip(out["fused"], out["torch"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
