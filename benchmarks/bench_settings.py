"""Device, dtype and sizes of `pytest benchmarks/`, importable by every
benchmark file (`from bench_settings import DEVICE, DTYPE, BATCH`) — a
uniquely named module, since `conftest` also names tests/conftest.py.

GPU in bf16 when one is visible, else CPU in fp32; $FUSED_RESNET_BENCH_DEVICE
(cpu | cuda) overrides the device, $FUSED_RESNET_BENCH_BATCH the CPU batch.
"""

import os

import torch

DEVICE = torch.device(os.environ.get("FUSED_RESNET_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
ON_GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
# Images per batch for block and network benchmarks.
BATCH = 256 if ON_GPU else int(os.environ.get("FUSED_RESNET_BENCH_BATCH", "8"))
