"""fused_resnet.fuse() on residual networks written the way people write
them (the block styles are defined here, not imported from the package),
on timm's ResNet variants and torchvision's detection and segmentation
backbones: eval and training outputs, every parameter gradient, running
statistics and a second step after an optimizer step, against eager with
the numerics criterion, in both memory formats; the fused paths must run
(counted), and the report must say what was fused and what was not."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import check_buffers, check_grads, randomise_bn

import fused_resnet
from fused_resnet import numerics
from fused_resnet.backends import bn_modules
from fused_resnet.nn.paths import units

# ------------------------------------------------------------ block styles


class D2LResidual(nn.Module):
    """Dive into Deep Learning's residual block: convs with bias, a 1x1 conv
    shortcut without BatchNorm."""

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


def d2l_resnet18(in_channels=3, num_classes=10):
    def stage(cin, cout, num, first=False):
        blocks = []
        for i in range(num):
            if i == 0 and not first:
                blocks.append(D2LResidual(cin, cout, use_1x1conv=True, strides=2))
            else:
                blocks.append(D2LResidual(cout, cout))
        return nn.Sequential(*blocks)

    return nn.Sequential(
        nn.Sequential(nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3), nn.BatchNorm2d(64), nn.ReLU(),
                      nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        stage(64, 64, 2, first=True), stage(64, 128, 2), stage(128, 256, 2), stage(256, 512, 2),
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(512, num_classes))


class KerasBlock(nn.Module):
    """The Keras functional style: conv-BN-ReLU, conv-BN, projection conv+BN
    shortcut, add, ReLU, with functional calls."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.cs, self.bs = nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        h = self.b2(self.c2(h))
        s = self.bs(self.cs(x))
        return F.relu(torch.add(h, s))


class PreAct(nn.Module):
    """Pre-activation (ResNet v2) block with nn.BatchNorm2d and nn.ReLU modules."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = self.relu1(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + shortcut


class SEBlock(nn.Module):
    """Squeeze-and-excitation between the last BN and the add: conv-BN-ReLU
    pairs still fuse, the last BN fuses without the add."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(out.mean((2, 3), keepdim=True)))))
        return F.relu(out * w + x)


def unet_encoder():
    def double_conv(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                             nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    return nn.Sequential(double_conv(3, 16), nn.MaxPool2d(2), double_conv(16, 32), nn.MaxPool2d(2), double_conv(32, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def small_net(block):
    stages = [block(16), block(16)] if block is SEBlock else [block(16, 16), block(16, 32, stride=2)]
    width = 16 if block is SEBlock else 32
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                         *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


# ------------------------------------------------------------ the checks


class Counter:
    """Counts the fused paths that run: units, BN + activation, add + ReLU."""

    def __init__(self, monkeypatch):
        self.calls = {"unit": 0, "bn_act": 0, "add_relu": 0}
        for name, owner in (("unit", units), ("bn_act", bn_modules)):
            real = getattr(owner, name)
            monkeypatch.setattr(owner, name, self._spy(name, real))
        import fused_resnet.nn.chains as chains

        real_add_relu = chains.ops.add_relu
        monkeypatch.setattr(chains.ops, "add_relu", self._spy("add_relu", real_add_relu))

    def _spy(self, name, real):
        def spy(*args, **kwargs):
            self.calls[name] += 1
            return real(*args, **kwargs)

        return spy


def _outputs(y):
    if isinstance(y, dict):
        return torch.cat([v.flatten() for v in y.values()])
    return y


def _run(model, x, dtype=None):
    return _outputs(model(x.to(dtype or next(model.parameters()).dtype)))


def check_fused_model(make, x, monkeypatch, channels_last=False, what="", expect_fused=1):
    """fp32: outputs and running statistics; fp64: the same and every
    parameter gradient. Gradients are judged in fp64 because a whole fp32
    network's gradients are a lottery of ReLU ties (a pre-activation within
    rounding of zero takes either side in two correct computations and moves
    a channel's gradient by O(1)); the fp32 kernels are the same code and
    are checked elementwise per op elsewhere."""
    fused = report = None
    for dtype in (torch.float32, torch.float64):
        fused, report = _check_fused_model(make, x, monkeypatch, channels_last, what, expect_fused, dtype)
    return fused, report


def _check_fused_model(make, x, monkeypatch, channels_last, what, expect_fused, dtype):
    what = f"{what} {str(dtype)[6:]}"
    torch.manual_seed(0)
    eager = make()
    randomise_bn(eager)
    ref = copy.deepcopy(eager).double()
    eager = eager.to(dtype)
    fused = fused_resnet.fuse(copy.deepcopy(eager))
    report = fused_resnet.fuse_report(fused)
    assert len(report.fused) + len(report.converted) >= expect_fused, f"{what}: nothing fused:\n{report}"
    assert list(fused.state_dict()) == list(eager.state_dict()), f"{what}: state_dict keys changed"
    if channels_last:
        for m in (fused, eager):
            m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    counter = Counter(monkeypatch)
    opt = torch.optim.SGD(fused.parameters(), lr=1e-3)
    for step in range(2):  # step 1 rechecks the fused model after an optimizer step
        if step == 1:
            # Against eager models holding the stepped model's state, so the
            # first step's rounding differences do not count against the second.
            for m in (eager, ref):
                m.load_state_dict(fused.state_dict())
        for train in (False, True):
            for m in (fused, eager, ref):
                m.train(train)
                m.zero_grad()
            calls_before = sum(counter.calls.values())
            yf, ye, yr = _run(fused, x), _run(eager, x), _run(ref, x.double())
            assert sum(counter.calls.values()) > calls_before, f"{what}: no fused path ran"
            numerics.assert_close_to_reference(yf, ye, yr, what=f"{what} step {step} train={train} output")
            if train:
                g = torch.randn(yr.shape, dtype=torch.float64)
                for y in (yf, ye, yr):
                    y.backward(g.to(y.dtype))
                if dtype == torch.float64:
                    check_grads(fused, eager, ref, f"{what} step {step}")
                check_buffers(fused, eager, ref, f"{what} step {step}")
        opt.step()
    return fused, report


X = torch.randn(4, 3, 64, 64)  # 64x64: the deepest BatchNorms see >= 16 values per channel


@pytest.mark.parametrize("channels_last", [False, True])
def test_d2l_resnet18(monkeypatch, channels_last):
    fused, report = check_fused_model(d2l_resnet18, X, monkeypatch, channels_last, "d2l resnet18", expect_fused=17)
    patterns = [p for _, p, _ in report.fused]
    assert patterns.count("conv+bn+add+relu") == 8 and patterns.count("conv+bn+relu") == 9, report


@pytest.mark.parametrize("block", [KerasBlock, PreAct, SEBlock], ids=lambda b: b.__name__)
@pytest.mark.parametrize("channels_last", [False, True])
def test_block_styles(monkeypatch, block, channels_last):
    x = torch.randn(4, 3, 16, 16)
    fused, report = check_fused_model(lambda: small_net(block), x, monkeypatch, channels_last, block.__name__)
    patterns = {p for _, p, _ in report.fused}
    if block is KerasBlock:
        assert {"conv+bn+add+relu", "conv+bn+relu", "conv+bn"} <= patterns, report
    if block is PreAct:
        assert "bn+relu->conv+bn+relu" in patterns and "bn+relu" in patterns, report
    if block is SEBlock:
        assert "conv+bn" in patterns and "conv+bn+relu" in patterns, report


class DeepStemNet(nn.Module):
    """Chains across a Sequential's boundary: a deep stem whose last conv is
    inside a Sequential with its BN and ReLU in the parent (timm's ResNet-D
    layout), and a residual main path Sequential(conv, BN, ReLU, conv, BN)
    whose add and ReLU are in the parent."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1, bias=False))
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU(inplace=True)
        self.main = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        x = self.act1(self.bn1(self.stem(x)))
        return self.head(F.relu(self.main(x) + x))


@pytest.mark.parametrize("channels_last", [False, True])
def test_chains_cross_sequential_boundaries(monkeypatch, channels_last):
    fused, report = check_fused_model(DeepStemNet, torch.randn(4, 3, 8, 8), monkeypatch, channels_last,
                                      "deep stem", expect_fused=4)
    assert sorted((p, m) for _, p, m in report.fused) == [
        ("conv+bn+add+relu", ("main.3", "main.4")), ("conv+bn+relu", ("main.0", "main.1")),
        ("conv+bn+relu", ("stem.0", "stem.1")), ("conv+bn+relu", ("stem.3", "bn1"))], report
    assert {w for w, _, _ in report.fused} == {""}, report  # all in the root's forward
    # The Sequentials keep their own forward: they run only through the root's.
    assert type(fused.stem) is nn.Sequential and type(fused.main) is nn.Sequential
    # A second fuse() leaves them to the root's forward.
    fused_resnet.fuse(fused, backend="reference")
    again = fused_resnet.fuse_report(fused)
    assert [(w, p) for w, p, _ in again.fused] == [("", "fused earlier (backend updated)")], again


class ChainedResidual(nn.Module):
    """The residual is the output of another fused chain."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x)) + x)


def test_a_residual_that_is_another_chains_output(monkeypatch):
    _, report = check_fused_model(ChainedResidual, torch.randn(4, 3, 8, 8), monkeypatch, what="chained residual",
                                  expect_fused=2)
    assert [p for _, p, _ in report.fused] == ["conv+bn+relu", "conv+bn+add+relu"], report


@pytest.mark.parametrize("make, in_place", [
    (d2l_resnet18, 3),  # the stride-2 blocks' 1x1-conv shortcuts
    (lambda: small_net(KerasBlock), 2),  # the projection conv + BN shortcuts
    (DeepStemNet, 0),  # the residual is also the main path's input
    (ChainedResidual, 0),  # the same
], ids=["d2l", "keras", "deep-stem", "chained"])
def test_inference_overwrites_only_residuals_nobody_reads(monkeypatch, make, in_place):
    """Under no_grad, a unit writes its result over a residual made in the
    same forward by a fused chain or a plain conv whose only reader is the
    add (oneDNN's sum post-op), and over nothing else; a global forward hook
    (which may hold a conv's output) turns that off."""
    from fused_resnet import _compat

    if not _compat.mkldnn_inplace_binary_available():
        pytest.skip("this torch has no in-place oneDNN conv + add")
    torch.manual_seed(0)
    eager = make().eval()
    randomise_bn(eager)
    ref = copy.deepcopy(eager).double()
    fused = fused_resnet.fuse(copy.deepcopy(eager), backend="cpu")
    calls = []
    real = _compat.mkldnn_conv_add_
    monkeypatch.setattr(_compat, "mkldnn_conv_add_", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(4, 3, 64, 64)  # no 1x1 outputs: _compat's 1x1 shim itself writes in place
    x_before = x.clone()
    with torch.no_grad():
        yf, ye, yr = fused(x), eager(x), ref(x.double())
        numerics.assert_close_to_reference(yf, ye, yr, what="inference output")
        assert torch.equal(x, x_before)
        assert len(calls) == in_place
        calls.clear()
        held = []
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: held.append(o))
        try:
            numerics.assert_close_to_reference(fused(x), ye, yr, what="inference output, global hook")
        finally:
            handle.remove()
        assert calls == []


def test_a_hooked_sequential_is_not_traced_through():
    net = DeepStemNet()
    seen = []
    net.stem.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    fused_resnet.fuse(net)
    report = fused_resnet.fuse_report(net)
    # The stem's last conv stays the stem's output (the hook sees it); the
    # stem's own conv+bn+relu is fused in its own forward.
    assert ("stem", "conv+bn+relu", ("stem.0", "stem.1")) in report.fused, report
    assert ("", "bn+relu", ("bn1",)) in report.fused, report
    net.eval()(torch.randn(2, 3, 8, 8))
    assert seen == [torch.Size([2, 8, 8, 8])]


def test_unet_encoder(monkeypatch):
    _, report = check_fused_model(unet_encoder, torch.randn(4, 3, 16, 16), monkeypatch, what="unet encoder",
                                  expect_fused=6)
    assert [p for _, p, _ in report.fused].count("conv+bn+relu") == 6, report


def _timm(name):
    timm = pytest.importorskip("timm")
    return lambda: timm.create_model(name, pretrained=False, num_classes=10)


@pytest.mark.parametrize("name", ["resnet50d", "resnetv2_50", "seresnet50", "resnet26t"])
def test_timm_variants(monkeypatch, name):
    check_fused_model(_timm(name), X, monkeypatch, what=f"timm {name}", expect_fused=10)


def test_torchvision_fcn_resnet50(monkeypatch):
    import torchvision

    def make():
        m = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3,
                                                         aux_loss=False)
        m.classifier[3].p = 0.0  # the head's dropout: a random mask eager and fused would draw apart
        return m

    _, report = check_fused_model(make, X, monkeypatch, what="fcn_resnet50")
    assert len(report.converted) == 16 and any(w.startswith("classifier") for w, _, _ in report.fused), report


@pytest.mark.parametrize("frozen", [False, True], ids=["batchnorm", "frozen-batchnorm"])
def test_torchvision_fasterrcnn_backbone(monkeypatch, frozen):
    import torchvision
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    def make():
        if frozen:  # what detection fine-tuning uses: BN frozen, the rest training
            return resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5,
                                       norm_layer=torchvision.ops.FrozenBatchNorm2d)
        # Without pretrained weights torchvision builds the body with nn.BatchNorm2d.
        return torchvision.models.detection.fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=3, trainable_backbone_layers=5).backbone

    _, report = check_fused_model(make, X, monkeypatch, what=f"fasterrcnn backbone frozen={frozen}")
    # The body's 16 bottlenecks take convert()'s path; the FPN has no BatchNorm.
    assert len(report.converted) == 16, report


# ------------------------------------------------------ semantics corners


class Corners(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, bias=True)  # a conv bias before BN
        self.bn_a = nn.BatchNorm2d(8, momentum=None)  # cumulative average
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(8, track_running_stats=False)
        self.c = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_c = nn.BatchNorm2d(8)  # held in eval while the model trains (below)
        self.d = nn.Conv2d(8, 8, 1, bias=False)
        self.bn_d = nn.BatchNorm2d(8)
        self.act = nn.SiLU()

    def forward(self, x):
        x = F.relu(self.bn_a(self.a(x)))
        x = torch.relu_(self.bn_b(self.b(x)))
        y = self.bn_c(self.c(x)).relu()
        return self.act(self.bn_d(self.d(y))) + x


@pytest.mark.parametrize("channels_last", [False, True])
def test_semantic_corners(monkeypatch, channels_last):
    def make():
        m = Corners()
        m.train()
        return m

    fused, report = check_fused_model(make, torch.randn(4, 3, 8, 8), monkeypatch, channels_last, "corners",
                                      expect_fused=4)
    patterns = [p for _, p, _ in report.fused]
    assert patterns.count("conv+bn+relu") == 3 and "conv+bn" in patterns, report  # SiLU runs unfused


def test_frozen_and_eval_bn_inside_a_training_model(monkeypatch):
    from torchvision.ops import FrozenBatchNorm2d

    def make():
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), FrozenBatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
        with torch.no_grad():
            m[1].running_var.uniform_(0.5, 2.0)
            m[1].weight.uniform_(0.5, 1.5)
        return m

    torch.manual_seed(0)
    eager = make()
    fused = fused_resnet.fuse(copy.deepcopy(eager))
    for m in (fused, eager):
        m.train()
        m[4].eval()  # frozen statistics while training
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(fused(x), eager(x), rtol=1e-5, atol=1e-5)
    assert [p for _, p, _ in fused_resnet.fuse_report(fused).fused] == ["conv+bn+relu", "conv+bn+relu"]


def test_chains_left_alone_say_why():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.hooked = nn.BatchNorm2d(4)
            self.hooked.register_forward_hook(lambda *a: None)

        def forward(self, x):
            z = self.conv(x)
            return F.relu(self.bn(z)) + z + self.hooked(z)  # z has three users: no conv+bn unit

    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: does not trace
                return self.seq(x)
            return self.conv(x)

    model = nn.Sequential(Odd(), nn.Identity())
    dyn = Dynamic()
    fused_resnet.fuse(model)
    fused_resnet.fuse(dyn)
    r1, r2 = fused_resnet.fuse_report(model), fused_resnet.fuse_report(dyn)
    assert [p for _, p, _ in r1.fused] == ["bn+relu"], r1  # the conv output has other users
    assert any("has a hook" in why for _, why in r1.left_alone), r1
    assert any("does not trace" in why for _, why in r2.left_alone), r2
    assert [w for w, _, _ in r2.fused] == ["seq"], r2  # the per-submodule fallback
    assert "fused" in str(r1) and "left" in str(r1)


def test_fuse_keeps_hooks_methods_and_identity(monkeypatch):
    net = d2l_resnet18()
    seen = []
    net[1][0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    same = fused_resnet.fuse(net)
    assert same is net and isinstance(net[1][0], D2LResidual)
    net.eval()(torch.randn(2, 3, 32, 32))
    assert seen == [torch.Size([2, 64, 8, 8])]


def test_fuse_is_idempotent_and_sets_the_backend():
    net = d2l_resnet18()
    fused_resnet.fuse(net)
    again = fused_resnet.fuse(net, backend="reference")
    assert again is net
    assert all(p == "fused earlier (backend updated)" for _, p, _ in fused_resnet.fuse_report(net).fused)
    calls = []
    real = units.unit
    try:
        units.unit = lambda *a, **k: calls.append(1) or real(*a, **k)
        with torch.no_grad():
            net.eval()(torch.randn(2, 3, 32, 32))
    finally:
        units.unit = real
    assert not calls, "backend='reference' must run eager ops"


def test_example_input_checks_and_restores_the_mode():
    net = d2l_resnet18().train()
    fused_resnet.fuse(net, example_input=torch.randn(2, 3, 32, 32))
    assert net.training


def test_fused_models_pickle_and_deepcopy():
    import pickle

    torch.manual_seed(0)
    net = fused_resnet.fuse(d2l_resnet18()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = net(x)
        for other in (pickle.loads(pickle.dumps(net)), copy.deepcopy(net)):
            assert type(other[1][0]).__mro__[1].__name__ == "_FusedModule"
            torch.testing.assert_close(other(x), want, rtol=0, atol=0)


def test_convert_sync_batchnorm_after_fuse_is_seen():
    net = fused_resnet.fuse(d2l_resnet18())
    fused_resnet.convert_sync_batchnorm(net)
    assert isinstance(net[1][0].bn1, fused_resnet.SyncBatchNorm2d)
    net.train()(torch.randn(4, 3, 64, 64))  # one process: plain batch statistics through the new modules
    assert int(net[1][0].bn1.num_batches_tracked) == 1


def test_torch_compile_fullgraph_and_export():
    torch.manual_seed(0)
    net = fused_resnet.fuse(small_net(KerasBlock)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = net(x)
        explanation = torch._dynamo.explain(net)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        ep = torch.export.export(net, (x,))
        torch.testing.assert_close(ep.module()(x), want, rtol=1e-5, atol=1e-5)
