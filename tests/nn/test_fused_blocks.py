"""The fused blocks end to end against torchvision's eager models.

Every comparison uses the numerics criterion (fused_resnet.numerics): the
fused model's error against an fp64 copy of the eager model must stay within
2x (outputs) / 3x (gradients) of eager fp32's own error, plus a small floor.
"""

import copy

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

import fused_resnet
from fused_resnet import numerics
from fused_resnet.backends import fold
from helpers import count_kernel_launches

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)


def make_trio(name, device="cpu", channels_last=False, **kw):
    """(fused, eager, fp64 reference) with identical weights."""
    torch.manual_seed(0)
    eager = getattr(torchvision.models, name)(num_classes=10, **kw)
    _randomise_bn(eager)
    fused = fused_resnet.MODEL_BUILDERS[name](num_classes=10, **kw)
    fused.load_state_dict(eager.state_dict())
    ref = copy.deepcopy(eager).double()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return fused.to(device, memory_format=fmt), eager.to(device, memory_format=fmt), ref


def _check_grads(fused, eager, ref, what, dtype=torch.float32, elementwise=None, eager_twins=()):
    """fp32 networks: normwise over all gradients (see numerics.compare_normwise:
    ReLU ties make an elementwise max a lottery across a whole network);
    fp64 networks and single blocks: every tensor elementwise."""
    named = list(zip(fused.named_parameters(), eager.named_parameters(), ref.named_parameters()))
    for (name, pf), _, _ in named:
        assert pf.grad is not None, f"{what}: no gradient for {name}"
    if elementwise is None:
        elementwise = dtype == torch.float64
    if elementwise:
        for (name, pf), (_, pe), (_, pr) in named:
            numerics.assert_close_to_reference(pf.grad, pe.grad, pr.grad, dtype=dtype, kind="grad",
                                               what=f"{what}: grad of {name}")
        return
    grads_f = [f.grad for (_, f), _, _ in named]
    grads_r = [r.grad for _, _, (_, r) in named]
    # Eager's own error: the larger of its NCHW and channels_last runs (each
    # draws its own ReLU-tie lottery), as `fused-resnet bench` does.
    verdicts = [numerics.compare_normwise(grads_f, [p.grad for p in e.parameters()], grads_r, dtype=dtype)
                for e in [eager] + list(eager_twins)]
    v = max(verdicts, key=lambda vd: vd.eager_err)
    assert v.ok, f"{what}: parameter gradients (normwise) outside the criterion: {v}"


def _check_buffers(fused, eager, ref, what, dtype=torch.float32):
    for (name, bf), (_, be), (_, br) in zip(fused.named_buffers(), eager.named_buffers(), ref.named_buffers()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(bf.cpu(), be.cpu()), f"{what}: {name}"
        else:
            numerics.assert_close_to_reference(bf, be, br, dtype=dtype, what=f"{what}: {name}")


def run_and_compare(fused, eager, ref, x, train, what, backward=True, dtype=torch.float32, eager_twins=()):
    """eager_twins: (copy of eager, input memory format, oneDNN on/off): other,
    equally valid eager executions (another layout, another CPU conv
    algorithm), whose gradient errors also count as "eager's own" for the
    normwise check: across a whole fp32 network, which pre-activations tie
    with zero is a lottery each execution draws differently."""
    twins = list(eager_twins)
    for m in [fused, eager, ref] + [t[0] for t in twins]:
        m.train(train)
    dev = next(eager.parameters()).device
    yf = fused(x)
    ye = eager(x)
    yr = ref(x.detach().cpu().double())
    numerics.assert_close_to_reference(yf, ye, yr, dtype=dtype, what=f"{what}: logits")
    if backward:
        g = torch.randn(yr.shape, dtype=torch.float64)
        yf.backward(g.to(dev, yf.dtype))
        ye.backward(g.to(dev, ye.dtype))
        yr.backward(g)
        for model, fmt, onednn in twins:
            with torch.backends.mkldnn.flags(enabled=onednn):
                model(x.contiguous(memory_format=fmt)).backward(g.to(dev, ye.dtype))
        _check_grads(fused, eager, ref, what, dtype, eager_twins=[t[0] for t in twins])
    _check_buffers(fused, eager, ref, what, dtype)


def eager_twins_of(eager, x):
    """The other layout with oneDNN as usual, and (on CPU) both layouts with
    oneDNN off (aten's own convolution)."""
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    same = torch.channels_last if cl else torch.contiguous_format
    other = torch.contiguous_format if cl else torch.channels_last
    specs = [(other, True)] + ([(same, False), (other, False)] if x.device.type == "cpu" else [])
    return [(copy.deepcopy(eager).to(memory_format=fmt), fmt, onednn) for fmt, onednn in specs]


MODELS = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_model_matches_eager(device, name, train, channels_last):
    fused, eager, ref = make_trio(name, device, channels_last)
    # 4 x 64x64 gives layer4's BatchNorms 16 values per channel (helpers.MIN_BN_VALUES).
    x = torch.randn(4, 3, 64, 64, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    run_and_compare(fused, eager, ref, x, train, f"{name} train={train} cl={channels_last}",
                    eager_twins=eager_twins_of(eager, x))


BLOCKS = [
    # (torchvision block, ours, inplanes, planes, stride, groups, base_width, dilation)
    ("basic", 16, 16, 1, 1, 64, 1),
    ("basic-downsample", 16, 32, 2, 1, 64, 1),
    ("bottleneck", 64, 16, 1, 1, 64, 1),
    ("bottleneck-downsample", 32, 16, 2, 1, 64, 1),
    ("bottleneck-grouped", 64, 16, 1, 4, 8, 1),
    ("bottleneck-dilated", 64, 16, 1, 1, 64, 2),
]


def _block_trio(kind, inplanes, planes, stride, groups, base_width, dilation):
    from torchvision.models.resnet import BasicBlock, Bottleneck

    tv_cls, our_cls = (BasicBlock, fused_resnet.FusedBasicBlock) if kind.startswith("basic") else (
        Bottleneck, fused_resnet.FusedBottleneck)
    torch.manual_seed(0)
    ds = None
    if stride != 1 or inplanes != planes * tv_cls.expansion:
        ds = torch.nn.Sequential(torch.nn.Conv2d(inplanes, planes * tv_cls.expansion, 1, stride, bias=False),
                                 torch.nn.BatchNorm2d(planes * tv_cls.expansion))
    eager = tv_cls(inplanes, planes, stride, ds, groups, base_width, dilation)
    _randomise_bn(eager)
    fused = fused_resnet.convert(copy.deepcopy(eager))
    assert isinstance(fused, our_cls)
    return fused, eager, copy.deepcopy(eager).double()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", BLOCKS, ids=[b[0] for b in BLOCKS])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_block_matches_eager_elementwise(device, spec, train, channels_last):
    """One block, identical inputs: every gradient elementwise."""
    fused, eager, ref = _block_trio(*spec)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fused.to(device, memory_format=fmt)
    eager.to(device, memory_format=fmt)
    x = torch.randn(3, spec[1], 9, 9, device=device).contiguous(memory_format=fmt)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_(), x.detach().cpu().double().requires_grad_()]
    for m in (fused, eager, ref):
        m.train(train)
    ys = [fused(xs[0]), eager(xs[1]), ref(xs[2])]
    numerics.assert_close_to_reference(*ys, what=f"{spec[0]} output")
    g = torch.randn(ys[2].shape, dtype=torch.float64)
    for y in ys:
        y.backward(g.to(y.device, y.dtype))
    numerics.assert_close_to_reference(*[t.grad for t in xs], kind="grad", what=f"{spec[0]} input grad")
    _check_grads(fused, eager, ref, spec[0], elementwise=True)
    _check_buffers(fused, eager, ref, spec[0])


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_model_matches_eager_in_fp64_strictly(name):
    """In fp64 no pre-activation ties with zero: every gradient channel must
    meet the criterion (no kink allowance) — the fused algorithm is exact."""
    fused, eager, ref = make_trio(name)
    fused.double()
    eager.double()
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    run_and_compare(fused, eager, ref, x, True, f"{name} fp64", dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_path_is_taken(device):
    """The comparisons above must exercise fused code, not the reference."""
    fused, _, _ = make_trio("resnet18", device)
    x = torch.randn(2, 3, 32, 32, device=device)
    assert fused.layer1[0].resolved_backend(x) != "reference"
    from fused_resnet.nn.paths import block as block_paths, units

    assert block_paths.block_supported(fused.layer1[0])
    calls = []
    orig = units.unit

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    units.unit = spy
    try:
        fused(x)
    finally:
        units.unit = orig
    assert len(calls) == 1 + 2 * 8 + 3  # stem + two per block + three downsamples


@pytest.mark.parametrize("device", DEVICES)
def test_step_then_recheck(device):
    """forward, backward, an SGD step, then eval: equal to eager doing the same."""
    fused, eager, ref = make_trio("resnet18", device)
    x = torch.randn(4, 3, 48, 48, device=device)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (fused, eager, ref)]
    for step in range(2):
        for m, opt in zip((fused, eager, ref), opts):
            m.train()
            opt.zero_grad()
            inp = x.detach().cpu().double() if m is ref else x
            m(inp).square().mean().backward()
            opt.step()
    for m in (fused, eager, ref):
        m.eval()
    with torch.no_grad():
        run_and_compare(fused, eager, ref, x, False, "after two SGD steps", backward=False)


def test_fold_cache_never_goes_stale():
    fused, eager, ref = make_trio("resnet18")
    x = torch.randn(2, 3, 32, 32)
    fused.eval()
    eager.eval()
    with torch.no_grad():
        fused(x)  # fills the caches
        for m in (fused, eager):
            m.layer2[0].bn1.running_var.mul_(3.0)
            m.layer3[1].conv2.weight.add_(0.01)
            m.bn1.bias.sub_(0.2)
        torch.testing.assert_close(fused(x), eager(x), rtol=1e-4, atol=1e-4)
        sd = {k: v.clone() for k, v in eager.state_dict().items()}
        sd["layer4.1.bn2.running_mean"] += 1.0
        fused.load_state_dict(sd)
        eager.load_state_dict(sd)
        torch.testing.assert_close(fused(x), eager(x), rtol=1e-4, atol=1e-4)
    # deepcopy of a model with warm caches (oneDNN packed weights inside) works
    twin = copy.deepcopy(fused)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), fused(x))
    fold.clear(fused)


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_momentum_none_and_untracked_stats(momentum):
    def norm(c):
        return torch.nn.BatchNorm2d(c, momentum=momentum)

    fused, eager, ref = make_trio("resnet18", norm_layer=norm)
    x = torch.randn(4, 3, 48, 48)
    for _ in range(3):
        run_and_compare(fused, eager, ref, x, True, f"momentum={momentum}", backward=False)

    def untracked(c):
        return torch.nn.BatchNorm2d(c, track_running_stats=False)

    fused, eager, ref = make_trio("resnet18", norm_layer=untracked)
    for train in (True, False):  # eval uses batch statistics too
        run_and_compare(fused, eager, ref, x, train, f"untracked train={train}")


def test_frozen_bn_modules_while_training():
    """Detection backbones keep BN in eval while the model trains (norm_eval)."""
    fused, eager, ref = make_trio("resnet50")
    for m in (fused, eager, ref):
        m.train()
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.eval()
    x = torch.randn(2, 3, 32, 32)
    yf, ye, yr = fused(x), eager(x), ref(x.double())
    numerics.assert_close_to_reference(yf, ye, yr, what="frozen-BN logits")
    for y in (yf, ye, yr):
        y.sum().backward()
    _check_grads(fused, eager, ref, "frozen BN")
    _check_buffers(fused, eager, ref, "frozen BN")


def test_frozen_batchnorm2d_norm_layer_and_zero_init_residual():
    fused, eager, ref = make_trio("resnet18", norm_layer=FrozenBatchNorm2d)
    x = torch.randn(2, 3, 32, 32)
    run_and_compare(fused, eager, ref, x, True, "FrozenBatchNorm2d")
    fused, eager, ref = make_trio("resnet50", zero_init_residual=True)
    with torch.no_grad():
        for m in (fused, eager, ref):
            for b in m.modules():
                if isinstance(b, (torchvision.models.resnet.Bottleneck, fused_resnet.FusedBottleneck)):
                    b.bn3.weight.zero_()
    run_and_compare(fused, eager, ref, torch.randn(4, 3, 48, 48), True, "zero_init_residual")


def test_no_grad_in_train_mode_and_inputs_without_grad():
    fused, eager, ref = make_trio("resnet18")
    x = torch.randn(4, 3, 48, 48)
    for m in (fused, eager, ref):
        m.train()
    with torch.no_grad():
        yf, ye, yr = fused(x), eager(x), ref(x.double())
    numerics.assert_close_to_reference(yf, ye, yr, what="no_grad train logits")
    _check_buffers(fused, eager, ref, "no_grad train")
    xg = torch.randn(4, 3, 48, 48, requires_grad=True)
    yf = fused(xg)
    ye = eager(xg)
    gf, = torch.autograd.grad(yf.sum(), xg)
    ge, = torch.autograd.grad(ye.sum(), xg)
    xr = xg.detach().double().requires_grad_()
    gr, = torch.autograd.grad(ref(xr).sum(), xr)
    numerics.assert_close_to_reference(gf, ge, gr, kind="grad", what="input gradient")


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_cpu_autocast(dtype):
    fused, eager, ref = make_trio("resnet18")
    x = torch.randn(4, 3, 48, 48)
    for train in (True, False):
        for m in (fused, eager, ref):
            m.train(train)
        with torch.autocast("cpu", dtype=dtype):
            yf, ye = fused(x), eager(x)
        assert yf.dtype == ye.dtype
        yr = ref(x.double())
        numerics.assert_close_to_reference(yf, ye, yr, dtype=dtype, what=f"autocast {dtype} train={train}")


def test_convert_runs_fused_path_and_matches():
    _, eager, ref = make_trio("resnet50")
    converted = fused_resnet.convert(copy.deepcopy(eager))
    x = torch.randn(4, 3, 48, 48)
    run_and_compare(converted, eager, ref, x, True, "converted resnet50")


# ---------------------------------------------------------- triton, interpreter

TRITON_BLOCKS = [("basic-downsample", 8, 16, 2, 1, 64, 1), ("bottleneck-grouped", 32, 8, 1, 4, 8, 1)]


@pytest.mark.interpreter
@pytest.mark.parametrize("spec", TRITON_BLOCKS, ids=[b[0] for b in TRITON_BLOCKS])
@pytest.mark.parametrize("train,prologue", [(True, False), (False, False), (True, True)],
                         ids=["train", "eval", "train-prologue"])
def test_blocks_on_the_triton_interpreter(spec, train, prologue, monkeypatch):
    """The blocks on `triton` through Triton's interpreter on CPU tensors
    (tiny sizes): the conv with the folded-BN epilogue in eval, the conv with
    the statistics epilogue + batch_norm_act in training, and training with
    each inner BN + ReLU in the next conv's prologue."""
    from fused_resnet.backends.triton import launch

    launched = []
    conv = launch.conv2d_bn_act
    monkeypatch.setattr(launch, "conv2d_bn_act", lambda *a, **k: launched.append(1) or conv(*a, **k))
    prologue_launches = count_kernel_launches(monkeypatch, "conv2d_fwd_prologue_kernel")
    fused_resnet.set_fusions(prologue=prologue)
    fused, eager, ref = _block_trio(*spec)
    fused.backend = "triton"
    fused.to(memory_format=torch.channels_last)
    eager.to(memory_format=torch.channels_last)
    x = torch.randn(2, spec[1], 7, 7).contiguous(memory_format=torch.channels_last)
    for m in (fused, eager, ref):
        m.train(train)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()]
    ys = [fused(xs[0]), eager(xs[1]), ref(xs[2])]
    numerics.assert_close_to_reference(*ys, what=f"{spec[0]} train={train} output")
    g = torch.randn(ys[2].shape, dtype=torch.float64)
    for y in ys:
        y.backward(g.to(y.dtype))
    numerics.assert_close_to_reference(*[t.grad for t in xs], kind="grad", what="input grad")
    _check_grads(fused, eager, ref, spec[0], elementwise=True)
    _check_buffers(fused, eager, ref, spec[0])
    assert launched, "the Triton kernel was not launched"
    assert (prologue_launches["conv2d_fwd_prologue_kernel"] > 0) == prologue, \
        "prologue kernel launches do not follow the switch"
