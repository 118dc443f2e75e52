import os

import pytest
import torch

# References run without TF32 (../DESIGN.md, numerics policy).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

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
