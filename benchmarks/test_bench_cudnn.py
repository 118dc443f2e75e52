"""Per layer: the cudnn backend's fused graphs vs cuDNN conv (aten) + eager
BatchNorm / add / ReLU, at ResNet-50's conv shapes, channels_last, batch 256,
bf16 and fp16. GPU only (skipped elsewhere).

- eval:  conv_bias_act (BN folded into the weights) vs conv + eval BN [+ add] + ReLU;
- train: conv_bn_train (conv + genstats graph, bn_finalize, bn_apply) vs
  conv + train BN [+ add] + ReLU (forward only: the backward is not fused yet).

extra_info: TFLOP/s of the conv, and `cudnn_fused` — False when cuDNN refused
the graph and the layer ran the aten fallback (its reason is in
`cudnn_fallback`), so a fast-looking number is never a misattributed one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fused_resnet.backends.cudnn import graphs as cudnn_graphs
from fused_resnet.ops import reference

from bench_settings import ON_GPU

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (ON_GPU and cudnn_graphs.built()), reason="needs a GPU and the cudnn backend built"),
]

BATCH = 256
# (name, C_in, C_out, kernel, stride, H=W of the input, has residual)
LAYERS = [
    ("l1-1x1-reduce", 256, 64, 1, 1, 56, False),
    ("l1-3x3", 64, 64, 3, 1, 56, False),
    ("l1-1x1-expand+add", 64, 256, 1, 1, 56, True),
    ("l2-3x3-s2", 128, 128, 3, 2, 56, False),
    ("l3-3x3", 256, 256, 3, 1, 14, False),
    ("l3-1x1-expand+add", 256, 1024, 1, 1, 14, True),
    ("l4-3x3", 512, 512, 3, 1, 7, False),
]
DTYPES = [torch.bfloat16, torch.float16]


def _layer(c_in, c_out, k, stride, hw, has_res, dtype):
    cl = torch.channels_last
    x = torch.randn(BATCH, c_in, hw, hw, device="cuda").to(dtype).contiguous(memory_format=cl)
    w = (torch.randn(c_out, c_in, k, k, device="cuda") / (c_in * k * k) ** 0.5).to(dtype).contiguous(memory_format=cl)
    bn = torch.nn.BatchNorm2d(c_out).cuda()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    out_hw = (hw + 2 * (k // 2) - k) // stride + 1
    r = torch.randn(BATCH, c_out, out_hw, out_hw, device="cuda").to(dtype).contiguous(memory_format=cl) if has_res else None
    return x, w, bn, r, out_hw


def _flops(c_in, c_out, k, out_hw):
    return 2 * BATCH * c_out * out_hw * out_hw * c_in * k * k


def _record(benchmark, flops, before):
    new = cudnn_graphs.fallbacks()[len(before):]
    benchmark.extra_info.update(cudnn_fused=not new, cudnn_fallback=new[0][1] if new else "")
    if benchmark.stats is not None:
        benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12


@pytest.mark.parametrize("provider", ["cudnn-fused", "aten-conv+eager"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("layer", LAYERS, ids=[layer[0] for layer in LAYERS])
def test_layer_eval(benchmark, timed, check, layer, dtype, provider):
    name, c_in, c_out, k, stride, hw, has_res = layer
    x, w, bn, r, out_hw = _layer(c_in, c_out, k, stride, hw, has_res, dtype)
    bn.eval()
    w_fold, b_fold = reference.fold_bn(w.float(), bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    w_fold = w_fold.to(dtype).contiguous(memory_format=torch.channels_last)

    def eager():
        y = F.batch_norm(F.conv2d(x, w, None, stride, k // 2), bn.running_mean, bn.running_var, bn.weight,
                         bn.bias, False, 0.0, bn.eps)
        return torch.relu(y + r if r is not None else y)

    def fused():
        return cudnn_graphs.conv_bias_act(x, w_fold, b_fold, r, True, stride, k // 2)

    before = cudnn_graphs.fallbacks()
    with torch.no_grad():
        out_eager = eager()
        out = fused() if provider == "cudnn-fused" else out_eager
        ref = F.batch_norm(F.conv2d(x.float(), w.float(), None, stride, k // 2), bn.running_mean, bn.running_var,
                           bn.weight, bn.bias, False, 0.0, bn.eps)
        ref = torch.relu(ref + r.float() if r is not None else ref)
        check(out, out_eager, ref, dtype, what=f"{name} eval")
        benchmark.group = f"cudnn layer {name} eval {dtype}"
        timed(benchmark, fused if provider == "cudnn-fused" else eager, x.device)
    _record(benchmark, _flops(c_in, c_out, k, out_hw), before)


@pytest.mark.parametrize("provider", ["cudnn-fused", "aten-conv+eager"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("layer", LAYERS, ids=[layer[0] for layer in LAYERS])
def test_layer_train_forward(benchmark, timed, check, layer, dtype, provider):
    name, c_in, c_out, k, stride, hw, has_res = layer
    x, w, bn, r, out_hw = _layer(c_in, c_out, k, stride, hw, has_res, dtype)
    bn.train()

    def eager():
        y = F.batch_norm(F.conv2d(x, w, None, stride, k // 2), bn.running_mean, bn.running_var, bn.weight,
                         bn.bias, True, 0.1, bn.eps)
        return torch.relu(y + r if r is not None else y)

    def fused():
        return cudnn_graphs.conv_bn_train(x, w, bn.weight, bn.bias, bn.running_mean, bn.running_var, None, 0.1,
                                        bn.eps, residual=r, relu=True, stride=stride, padding=k // 2)[0]

    before = cudnn_graphs.fallbacks()
    with torch.no_grad():
        out_eager = eager()
        out = fused() if provider == "cudnn-fused" else out_eager
        ref = F.batch_norm(F.conv2d(x.float(), w.float(), None, stride, k // 2), None, None, bn.weight, bn.bias,
                           True, 0.0, bn.eps)
        ref = torch.relu(ref + r.float() if r is not None else ref)
        check(out, out_eager, ref, dtype, what=f"{name} train forward")
        benchmark.group = f"cudnn layer {name} train-forward {dtype}"
        timed(benchmark, fused if provider == "cudnn-fused" else eager, x.device)
    _record(benchmark, _flops(c_in, c_out, k, out_hw), before)
