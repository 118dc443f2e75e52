"""`make gpu-check`: one prepared command that turns a short GPU lease into
network-level figures, most valuable first, each on disk the moment it
exists.

    python -m fused_resnet.gpu_check --plan          # the steps, estimated seconds, their basis
    python -m fused_resnet.gpu_check                 # the lease profile (the default)
    python -m fused_resnet.gpu_check --rehearsal     # the same path on the CPU, tiny (make test runs it)

Steps (lease profile; plan.py): install the carried wheels (.whl/), build
the extension for this GPU's architecture with a job per core (the cudnn
backend included), `fused-resnet bench` on resnet50 bf16 channels_last
batch 256 for inference and then training (eager AMP, fused-cuda,
fused-triton, fused-triton with the BN prologue in training, fused-cudnn;
each conv unit then timed alone per backend), torch.compile beside the
fused backends; then tests with the time left (one fast test per op and
backend first), then compute-sanitizer memcheck on the CUDA BatchNorm
kernels. Each step has its own time limit and each provider its own
budget; a provider that runs out is recorded as such and the next runs.

Record (record.py): benchmarks/results/<date>-<gpu>/ (record.json,
summary.md, log.txt, autotune.json, auto_choice.json), copied to $OUT.
The Triton autotune cache starts from the newest earlier record of the same
GPU (tuned_configs.py). See benchmarks/README.md for the device call.
"""

from .check import main

__all__ = ["main"]
