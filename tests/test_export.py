"""torch.export of an eval-mode fused model: our ops stay in the graph, the
exported program reproduces the model, and fused_resnet.export lowers them to
standard aten ops (and on to ONNX) for consumers without our library."""

import pytest
import torch

import fused_resnet
from fused_resnet import export as fexport

NATIVE = "cpu" in fused_resnet.available_backends()


@pytest.fixture(scope="module")
def model_and_program():
    torch.manual_seed(0)
    model = fused_resnet.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    return model, x, torch.export.export(model, (x,))


def test_exported_program_matches_and_holds_our_ops(model_and_program):
    model, x, program = model_and_program
    if NATIVE:
        assert "fused_resnet.add_relu.default" in fexport.fused_ops_in(program)
    x2 = torch.randn(2, 3, 32, 32)  # not the example input
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x2), model(x2), rtol=1e-5, atol=1e-5)


def test_no_grad_export_keeps_the_pool_op_and_lowers_it():
    if not NATIVE:
        pytest.skip("fused_resnet._C not built")
    torch.manual_seed(0)
    model = fused_resnet.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        assert "fused_resnet.max_pool2d.default" in fexport.fused_ops_in(program)
        lowered = fexport.to_aten(program)
        assert fexport.fused_ops_in(lowered) == []
        torch.testing.assert_close(lowered.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_to_aten_removes_every_fused_op(model_and_program):
    model, x, program = model_and_program
    lowered = fexport.to_aten(program)
    assert fexport.fused_ops_in(lowered) == []
    with torch.no_grad():
        torch.testing.assert_close(lowered.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_every_decomposition_matches_its_op():
    # Each decomposition against the op itself on small inputs.
    table = {str(k): v for k, v in fexport.decompositions().items()}
    if not NATIVE:
        pytest.skip("fused_resnet._C not built: no native ops to decompose")
    z = torch.randn(2, 3, 4, 4)
    r = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(table["fused_resnet.add_relu.default"](z, r), torch.ops.fused_resnet.add_relu(z, r))
    scale, shift = torch.rand(3) + 0.5, torch.randn(3)
    got = table["fused_resnet.bn_apply.default"](z, scale, shift, r, True)
    want = torch.ops.fused_resnet.bn_apply(z, scale, shift, r, True)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])  # the packed ReLU mask, bit for bit
    torch.testing.assert_close(table["fused_resnet.max_pool2d.default"](z, [3, 3], [2, 2], [1, 1], [1, 1], True),
                               torch.ops.fused_resnet.max_pool2d(z, [3, 3], [2, 2], [1, 1], [1, 1], True))
    got_m, got_v = table["fused_resnet.bn_stats.default"](z)
    want_m, want_v = torch.ops.fused_resnet.bn_stats(z)
    torch.testing.assert_close(got_m, want_m), torch.testing.assert_close(got_v, want_v)


def test_onnx_export_has_standard_operators_only(model_and_program, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model, x, _ = model_and_program
    path = tmp_path / "resnet18.onnx"
    fexport.export_onnx(model, (x,), str(path))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    domains = {n.domain for n in proto.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    assert "Conv" in {n.op_type for n in proto.graph.node}


def test_onnx_model_runs_in_onnxruntime(model_and_program, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model, x, _ = model_and_program
    path = tmp_path / "resnet18.onnx"
    fexport.export_onnx(model, (x,), str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), model(x), rtol=1e-4, atol=1e-4)
