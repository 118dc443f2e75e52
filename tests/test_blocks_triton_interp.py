"""The fused blocks on the `triton` backend, through Triton's interpreter on
CPU tensors (tiny sizes): Triton conv with folded-BN epilogue in eval, conv
with the statistics epilogue + batch_norm_act in training, and training with
the "prologue" fusion (inner BN + ReLU in the next conv's prologue).

TRITON_INTERPRET is read when kernels are decorated, so the checks run in a
child process started with it set; this process only launches the child and
reads its verdict (every case must run and pass)."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import copy, json, sys
import torch
sys.path.insert(0, HERE)
import fused_resnet
from fused_resnet import numerics
from test_fused_blocks import _block_trio, _check_grads, _check_buffers

# Count launches of the Triton kernel itself, not just calls of the op.
calls = []
import fused_resnet.backends.triton.launch as launch
orig = launch.conv2d_bn_act
def spy(*a, **k):
    calls.append(1)
    return orig(*a, **k)
launch.conv2d_bn_act = spy

pro_calls = []
pro_kernel = launch.conv2d_fwd_prologue_kernel
class ProSpy:
    def __getitem__(self, grid):
        pro_calls.append(1)
        return pro_kernel[grid]
launch.conv2d_fwd_prologue_kernel = ProSpy()

results = []
specs = [("basic-downsample", 8, 16, 2, 1, 64, 1), ("bottleneck-grouped", 32, 8, 1, 4, 8, 1)]
# (train, prologue fusion): eval, training, and training with every inner
# BN + ReLU in the next conv's prologue.
for spec in specs:
    for train, prologue in ((True, False), (False, False), (True, True)):
        fused_resnet.set_fusions(prologue=prologue)
        p0 = len(pro_calls)
        fused, eager, ref = _block_trio(*spec)
        fused.backend = "triton"
        fused.to(memory_format=torch.channels_last)
        eager.to(memory_format=torch.channels_last)
        x = torch.randn(2, spec[1], 7, 7).contiguous(memory_format=torch.channels_last)
        for m in (fused, eager, ref):
            m.train(train)
        n0 = len(calls)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()]
        ys = [fused(xs[0]), eager(xs[1]), ref(xs[2])]
        numerics.assert_close_to_reference(*ys, what=f"{spec[0]} train={train} output")
        g = torch.randn(ys[2].shape, dtype=torch.float64)
        for y in ys:
            y.backward(g.to(y.dtype))
        numerics.assert_close_to_reference(*[t.grad for t in xs], kind="grad", what="input grad")
        _check_grads(fused, eager, ref, spec[0], elementwise=True)
        _check_buffers(fused, eager, ref, spec[0])
        assert len(calls) > n0, "the Triton kernel was not launched"
        assert (len(pro_calls) > p0) == prologue, "prologue kernel launches do not follow the switch"
        results.append(f"{spec[0]}-train={train}-prologue={prologue}")
print("RESULTS " + json.dumps(results))
"""


def test_fused_blocks_on_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("FUSED_RESNET_BACKEND", None)
    env.pop("FUSED_RESNET_FUSIONS", None)
    code = f"HERE = {HERE!r}\n" + CHILD
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert line, out[-3000:]
    assert len(json.loads(line[-1][len("RESULTS "):])) == 6
