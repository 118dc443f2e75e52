"""Train a residual network through fused_resnet.fuse(), on one process or
many (DDP with synchronised BatchNorm), with checkpoints.

    python examples/train.py --model d2l_resnet18 --epochs 2                # CPU or one GPU
    torchrun --nproc_per_node 2 examples/train.py --model torchvision:resnet18 --sync-bn
    python examples/train.py --model timm:resnet50d --steps 50 --checkpoint ck.pt
    python examples/train.py --model timm:resnet50d --checkpoint ck.pt --resume

Data: scikit-learn's handwritten digits (8x8, 10 classes, bundled with
scikit-learn: no download), upsampled to --image-size and repeated to 3
channels, split 80/20. Any torchvision or timm ResNet (`torchvision:NAME`,
`timm:NAME`) or the d2l ResNet-18 written below as a textbook would; the
model goes through fused_resnet.fuse() (convert()'s fast path for
torchvision/timm ResNets, graph fusion for the rest; the report is printed),
channels_last, AMP (bf16) on a GPU, DDP over NCCL on GPUs or Gloo on CPUs
with fused_resnet.convert_sync_batchnorm (--sync-bn) after fuse().
Checkpoints hold the model's state_dict (the same keys as the unfused
model's), the optimizer's and the step; --resume continues from one.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import fused_resnet


class D2LResidual(nn.Module):
    """The residual block of Dive into Deep Learning (convs with bias, a 1x1
    conv shortcut without BatchNorm), as the book writes it."""

    def __init__(self, cin, cout, use_1x1conv=False, strides=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, kernel_size=3, padding=1, stride=strides)
        self.conv2 = nn.Conv2d(cout, cout, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(cin, cout, kernel_size=1, stride=strides) if use_1x1conv else None
        self.bn1 = nn.BatchNorm2d(cout)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, X):
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3:
            X = self.conv3(X)
        Y += X
        return F.relu(Y)


def d2l_resnet18(num_classes: int) -> nn.Module:
    def stage(cin, cout, first=False):
        return nn.Sequential(D2LResidual(cin, cout, use_1x1conv=not first, strides=1 if first else 2),
                             D2LResidual(cout, cout))

    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3), nn.BatchNorm2d(64), nn.ReLU(),
                      nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        stage(64, 64, first=True), stage(64, 128), stage(128, 256), stage(256, 512),
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(512, num_classes))


def build_model(spec: str, num_classes: int) -> nn.Module:
    if spec == "d2l_resnet18":
        return d2l_resnet18(num_classes)
    lib, _, name = spec.partition(":")
    if lib == "torchvision":
        import torchvision

        return getattr(torchvision.models, name)(num_classes=num_classes)
    if lib == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    raise SystemExit(f"--model must be d2l_resnet18, torchvision:NAME or timm:NAME, got {spec!r}")


def digits(image_size: int) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - 0.5) / 0.5
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    split = int(0.8 * len(y))
    train, test = order[:split], order[split:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="d2l_resnet18")
    ap.add_argument("--backend", default=None, help="fused_resnet backend (default: auto)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="stop after this many steps (all epochs by default)")
    ap.add_argument("--batch-size", type=int, default=32, help="per process")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across processes")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--checkpoint", default=None, help="save the state here (rank 0), at the end of every epoch")
    ap.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    args = ap.parse_args(argv)

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)

    train_set, test_set = digits(args.image_size)
    model = build_model(args.model, num_classes=10)
    model = fused_resnet.fuse(model, backend=args.backend)
    if rank == 0:
        print(fused_resnet.fuse_report(model))
    memory_format = torch.contiguous_format if args.no_channels_last else torch.channels_last
    model = model.to(device, memory_format=memory_format)
    if distributed and args.sync_bn:
        fused_resnet.convert_sync_batchnorm(model)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    step = 0
    if args.resume:
        state = torch.load(args.checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        if rank == 0:
            print(f"resumed from {args.checkpoint} at step {step}")
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if distributed else model
    sampler = DistributedSampler(train_set, shuffle=True, seed=0) if distributed else None
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None,
                        drop_last=True)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                  enabled=False)
    done = False
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        t0 = time.perf_counter()
        for x, y in loader:
            x = x.to(device, memory_format=memory_format, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with amp:
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if rank == 0:
                print(f"epoch {epoch} step {step} loss {loss.item():.4f}")
            if args.steps is not None and step >= args.steps:
                done = True
                break
        if rank == 0:
            print(f"epoch {epoch}: {time.perf_counter() - t0:.1f} s")
            if args.checkpoint:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step},
                           args.checkpoint)
                print(f"saved {args.checkpoint} at step {step}")
        if done:
            break

    model.eval()
    correct = total = 0
    with torch.no_grad(), amp:
        for x, y in DataLoader(test_set, batch_size=256):
            pred = model(x.to(device, memory_format=memory_format)).argmax(dim=1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
    if rank == 0:
        print(f"test accuracy {correct / total:.3f} ({total} images)")
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
