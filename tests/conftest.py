import os

import pytest
import torch

# References run without TF32 (docs/numerics.md).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# On a GPU, tests take each conv problem's first Triton config untimed:
# timing every candidate of every test shape made the CUDA tests several
# times slower, and correctness does not depend on which config wins.
# test_triton_conv_cuda runs every candidate and the autotuner itself.
# The variable covers child processes; the setting covers this one, whatever
# imported fused_resnet first.
if "FUSED_RESNET_AUTOTUNE" not in os.environ:
    os.environ["FUSED_RESNET_AUTOTUNE"] = "0"
    import fused_resnet  # noqa: E402

    fused_resnet.set_autotune(False)

import interpreter  # noqa: E402
from helpers import HAS_CUDA  # noqa: E402


@pytest.hookimpl(trylast=True)  # after -k / -m have selected
def pytest_collection_modifyitems(session, config, items):
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
    # The `interpreter` tests run in one TRITON_INTERPRET=1 child (interpreter.py).
    interpreter.select(session, config, items)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_settings():
    """Every test starts from, and leaves, the settings the process began
    with (fused_resnet.config): a test that changes the backend, a fusion or
    the autotune switch cannot leak into the next."""
    from fused_resnet import config

    saved = config.snapshot()
    yield
    config.restore(saved)


@pytest.fixture
def devices():
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_report_header(config):
    import fused_resnet

    av = fused_resnet.availability()
    return "fused_resnet backends: " + ", ".join(f"{k}={'yes' if v.available else 'no'}" for k, v in av.items()) + (
        f"; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
    )


# --------------------------------------------------------------- conditioning
# A comparison of two BatchNorm implementations in training is meaningful
# only when every BatchNorm sees enough values per channel: with two, the
# normalised output is +-1 whatever the input and its gradient is pure
# cancellation, so which side of a ReLU a value lands on is luck. Every test
# that compares results (through fused_resnet.numerics) while a BatchNorm
# computed batch statistics over fewer than MIN_BN_VALUES values per channel
# fails, unless marked @pytest.mark.ill_conditioned_ok("why").
from helpers import MIN_BN_VALUES  # noqa: E402


@pytest.fixture(autouse=True)
def _batchnorm_conditioning(request, monkeypatch):
    import torch.nn.functional as F

    if request.node.get_closest_marker("torchscript") is not None:
        # torch.jit.script would compile the F.batch_norm wrapper below.
        yield
        return

    from fused_resnet import numerics

    smallest = []
    compared = []
    real_batch_norm, real_compare, real_normwise = F.batch_norm, numerics.compare, numerics.compare_normwise

    def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                   eps=1e-5):
        if ((training or running_mean is None) and isinstance(input, torch.Tensor)
                and not torch.compiler.is_compiling() and input.dim() >= 2 and input.shape[1] > 0):
            smallest.append(input.numel() // input.shape[1])
        return real_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)

    def compare(*args, **kwargs):
        compared.append(True)
        return real_compare(*args, **kwargs)

    def compare_normwise(*args, **kwargs):
        compared.append(True)
        return real_normwise(*args, **kwargs)

    monkeypatch.setattr(F, "batch_norm", batch_norm)
    monkeypatch.setattr(numerics, "compare", compare)
    monkeypatch.setattr(numerics, "compare_normwise", compare_normwise)
    yield
    least = min((n for n in smallest if n > 1), default=None)
    if (compared and least is not None and least < MIN_BN_VALUES
            and request.node.get_closest_marker("ill_conditioned_ok") is None):
        pytest.fail(f"ill-conditioned comparison: a BatchNorm in training saw only {least} values per channel "
                    f"(at least {MIN_BN_VALUES} make the result depend on the implementation, not on luck); "
                    "use larger inputs", pytrace=False)
