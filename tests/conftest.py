import os

import pytest
import torch

# References run without TF32 (../DESIGN.md, numerics policy).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# On a GPU, tests take each conv problem's first Triton config untimed:
# timing every candidate of every test shape made the CUDA tests several
# times slower, and correctness does not depend on which config wins.
# test_triton_conv_cuda runs every candidate and the autotuner itself.
os.environ.setdefault("FUSED_RESNET_AUTOTUNE", "0")

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def devices():
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_report_header(config):
    import fused_resnet

    av = fused_resnet.availability()
    return "fused_resnet backends: " + ", ".join(f"{k}={'yes' if v.available else 'no'}" for k, v in av.items()) + (
        f"; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
    )
