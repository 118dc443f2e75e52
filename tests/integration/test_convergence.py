"""Training on real data: a small fused ResNet and the same eager ResNet, from
the same seed, on scikit-learn's handwritten digits (8x8, upsampled to 32x32).
The loss curves must track each other and both must reach the same test
accuracy within 1 point."""

import pytest
import torch
import torch.nn.functional as F
import torchvision

import fused_resnet

sklearn_datasets = pytest.importorskip("sklearn.datasets")

STEPS = 300
BATCH = 32
# Two correct fp32 trainings drift apart (different rounding -> different
# weights -> different batches' losses), so the loss-curve tolerance is
# stated relative to the drift between two *eager* runs that differ only in
# rounding (NCHW vs channels_last convolutions): the fused curve may stray
# from eager's at most CURVE_FACTOR times as far, or CURVE_FLOOR.
CURVE_FACTOR = 2.0
CURVE_FLOOR = 0.1
ACCURACY_POINTS = 1.0


def _digits():
    d = sklearn_datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    n_test = 360
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def _small_resnet(cls, block):
    torch.manual_seed(0)
    return cls(block, [1, 1, 1, 1], num_classes=10)


def _train(model, train, steps, fmt=torch.channels_last):
    xs, ys = train
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    # Annealed to zero so every run ends at a settled model, not a noisy one.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(1)
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(ys), (BATCH,), generator=g)
        x = xs[idx].contiguous(memory_format=fmt)
        loss = F.cross_entropy(model(x), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _accuracy(model, test):
    model.eval()
    with torch.no_grad():
        pred = model(test[0].contiguous(memory_format=torch.channels_last)).argmax(1)
    return 100.0 * (pred == test[1]).float().mean().item()


def _smooth(v, k=20):
    t = torch.tensor(v)
    return torch.stack([t[max(0, i - k + 1): i + 1].mean() for i in range(len(v))])


@pytest.mark.slow
def test_fused_and_eager_train_alike_on_digits():
    train, test = _digits()
    eager = _small_resnet(torchvision.models.ResNet, torchvision.models.resnet.BasicBlock)
    fused = _small_resnet(fused_resnet.ResNet, fused_resnet.FusedBasicBlock)
    baseline = _small_resnet(torchvision.models.ResNet, torchvision.models.resnet.BasicBlock)
    fused.load_state_dict(eager.state_dict())
    eager.to(memory_format=torch.channels_last)
    fused.to(memory_format=torch.channels_last)
    assert fused.layer1[0].resolved_backend(train[0]) != "reference"

    le = _train(eager, train, STEPS)
    lf = _train(fused, train, STEPS)
    lb = _train(baseline, train, STEPS, fmt=torch.contiguous_format)
    gap = (_smooth(le) - _smooth(lf)).abs().max().item()
    drift = (_smooth(le) - _smooth(lb)).abs().max().item()
    acc_e, acc_f = _accuracy(eager, test), _accuracy(fused, test)
    print(f"final loss eager {le[-1]:.4f} fused {lf[-1]:.4f}; smoothed gap {gap:.4f} (eager NCHW vs "
          f"channels_last: {drift:.4f}); accuracy eager {acc_e:.2f} fused {acc_f:.2f}")
    assert le[-1] < 0.2 * le[0], "eager did not learn: the test would prove nothing"
    assert gap <= max(CURVE_FLOOR, CURVE_FACTOR * drift), (gap, drift)
    assert abs(acc_e - acc_f) <= ACCURACY_POINTS, (acc_e, acc_f)
    assert acc_f >= 90.0
