"""torchvision compatibility: builders, state_dicts, and parity of the
reference backend (bit-identical to torchvision) and of convert()."""

import copy

import pytest
import torch
import torchvision

import fused_resnet

BUILDERS = list(fused_resnet.MODEL_BUILDERS)


@pytest.mark.parametrize("name", BUILDERS)
def test_state_dict_keys_and_shapes_match_torchvision(name):
    ours = fused_resnet.MODEL_BUILDERS[name](num_classes=10).state_dict()
    theirs = getattr(torchvision.models, name)(num_classes=10).state_dict()
    assert list(ours) == list(theirs)
    for k in ours:
        assert ours[k].shape == theirs[k].shape, k
        assert ours[k].dtype == theirs[k].dtype, k


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_same_seed_same_init_and_strict_load_both_ways(name):
    torch.manual_seed(1)
    ours = fused_resnet.MODEL_BUILDERS[name]()
    torch.manual_seed(1)
    theirs = getattr(torchvision.models, name)()
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), k
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)


def test_constructor_arguments_follow_torchvision():
    m = fused_resnet.resnet50(num_classes=7, zero_init_residual=True, replace_stride_with_dilation=[False, True, True])
    assert m.fc.out_features == 7
    assert all(float(b.bn3.weight.detach().abs().sum()) == 0 for b in m.modules() if isinstance(b, fused_resnet.FusedBottleneck))
    assert m.layer4[1].conv2.dilation == (4, 4) and m.layer4[0].conv2.stride == (1, 1)
    with pytest.raises(ValueError, match="replace_stride_with_dilation"):
        fused_resnet.resnet50(replace_stride_with_dilation=[True])
    with pytest.raises(ValueError, match="groups"):
        fused_resnet.resnext50_32x4d(groups=8)
    with pytest.raises(ValueError, match="BasicBlock only supports groups=1"):
        fused_resnet.resnet18(groups=2)


def _pair(name, **kw):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(**kw)
    ours = fused_resnet.MODEL_BUILDERS[name](**kw)
    ours.load_state_dict(theirs.state_dict())
    # Non-trivial BN statistics and affine parameters.
    with torch.no_grad():
        for m_o, m_t in zip(ours.modules(), theirs.modules()):
            if isinstance(m_t, torch.nn.BatchNorm2d):
                for t in (m_t.weight, m_t.bias, m_t.running_mean):
                    t.uniform_(-0.5, 0.5) if t is not m_t.weight else t.uniform_(0.5, 1.5)
                m_t.running_var.uniform_(0.5, 2.0)
        ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
@pytest.mark.parametrize("train", [True, False])
def test_reference_backend_is_bit_identical_to_torchvision(name, train):
    ours, theirs = _pair(name, num_classes=10)
    ours.set_backend("reference")
    ours.train(train)
    theirs.train(train)
    x = torch.randn(2, 3, 64, 64)
    yo, yt = ours(x), theirs(x)
    assert torch.equal(yo, yt)
    if train:
        yo.square().sum().backward()
        yt.square().sum().backward()
        for (k, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
            assert torch.equal(p.grad, q.grad), k
        for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), k


@pytest.mark.parametrize("train", [True, False])
def test_convert_keeps_outputs_state_and_mode(train):
    _, theirs = _pair("resnet18", num_classes=10)
    theirs = theirs.to(memory_format=torch.channels_last).train(train)
    original = copy.deepcopy(theirs)
    x = torch.randn(2, 3, 48, 48)
    converted = fused_resnet.convert(theirs)
    assert converted is theirs
    assert isinstance(converted, torchvision.models.ResNet)
    assert isinstance(converted.layer1[0], fused_resnet.FusedBasicBlock)
    assert converted.training == train and converted.layer2[1].training == train
    assert converted.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert list(converted.state_dict()) == list(original.state_dict())
    yc, yo = converted(x), original(x)
    torch.testing.assert_close(yc, yo, rtol=1e-5, atol=1e-5)
    converted.set_backend = None  # convert() must not rely on our ResNet class
    fused_resnet.convert(converted, backend="reference")
    assert torch.equal(converted(x), original(x)) or not train


def test_convert_shares_parameters_with_the_original_blocks():
    m = torchvision.models.resnet50(num_classes=5)
    w = m.layer3[2].conv2.weight
    fused_resnet.convert(m)
    assert isinstance(m.layer3[2], fused_resnet.FusedBottleneck)
    assert m.layer3[2].conv2.weight is w
    assert isinstance(m.layer3[0].downsample, torch.nn.Sequential)


def test_mismatched_state_dict_gives_pytorch_error():
    m = fused_resnet.resnet18(num_classes=10)
    sd = torchvision.models.resnet18(num_classes=10).state_dict()
    sd.pop("layer1.0.bn1.num_batches_tracked")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*num_batches_tracked(.|\n)*Unexpected key\(s\).*extra"):
        m.load_state_dict(sd)
    sd = torchvision.models.resnet18(num_classes=10).state_dict()
    sd["fc.weight"] = torch.zeros(3, 512)
    with pytest.raises(RuntimeError, match="size mismatch for fc.weight"):
        m.load_state_dict(sd)
