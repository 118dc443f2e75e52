"""torch.utils.checkpoint over fused blocks gives eager's results: outputs,
gradients and running statistics. Eager BatchNorm updates its running
statistics again when checkpoint recomputes the forward (so they move twice
per step); the fused blocks must do exactly the same."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from helpers import check_buffers, check_grads, make_trio

from fused_resnet import numerics




def _run(model, x, use_reentrant):
    # Stem eagerly, every residual stage under checkpoint.
    out = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        out = checkpoint(layer, out, use_reentrant=use_reentrant)
    return model.fc(torch.flatten(model.avgpool(out), 1))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_blocks_match_eager(use_reentrant):
    fused, eager, ref = make_trio("resnet18")
    for m in (fused, eager, ref):
        m.train()
    # 4 x 64x64: layer4's BatchNorms see 16 values per channel (helpers.MIN_BN_VALUES);
    # reentrant checkpointing needs an input that wants grad.
    x = torch.randn(4, 3, 64, 64, requires_grad=use_reentrant)
    yf, ye, yr = _run(fused, x, use_reentrant), _run(eager, x, use_reentrant), _run(ref, x.detach().double().requires_grad_(use_reentrant), use_reentrant)
    numerics.assert_close_to_reference(yf, ye, yr, what="checkpointed logits")
    g = torch.randn(yr.shape, dtype=torch.float64)
    yf.backward(g.float()), ye.backward(g.float()), yr.backward(g)
    check_grads(fused, eager, ref, "checkpointed")
    # Running stats were updated twice (forward + recomputation), as eager's.
    assert int(eager.layer1[0].bn1.num_batches_tracked) == 2
    check_buffers(fused, eager, ref, "checkpointed")


def test_checkpoint_sequential_over_fused_blocks():
    fused, eager, ref = make_trio("resnet18")
    x = torch.randn(2, 64, 8, 8)
    outs = []
    for m in (fused.layer1, eager.layer1, ref.layer1):
        m.train()
        xin = x.double() if m is ref.layer1 else x
        outs.append(checkpoint_sequential(m, 2, xin, use_reentrant=False))
    numerics.assert_close_to_reference(*outs, what="checkpoint_sequential layer1")
