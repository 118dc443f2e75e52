"""Which tests the GPU check runs, in which order.

SMOKE: one fast test per op and backend, run first and alone (no workers to
start), so that even a lease whose benchmarks took most of the time says
whether each kernel family is right on this GPU. Entries are pytest -k
terms (function name with its parameter id): a term no test matches
selects nothing, where a node id that does not exist would stop pytest, so
an id that only exists with a GPU (a "-cuda" device parameter) is safe.
tests/tools/test_gpu_check.py checks that every named test function exists.

CUDA_TESTS: what runs next with the time left, over xdist workers: the tests
whose names or marks say CUDA, cuDNN or Triton, less what cannot pass or
fit here.
"""

from __future__ import annotations

# (file, test function, parameter id or None, what it covers)
SMOKE = [
    ("tests/build/test_cuda_build.py", "test_bn_op_has_cuda_kernel", None, "every BN op has a CUDA kernel"),
    ("tests/backends/cuda/test_bn_cuda.py", "test_stats_apply_backward_match_reference", "0-shape0-True-dtype0",
     "cuda: bn_stats, bn_apply, bn_backward"),
    ("tests/backends/cuda/test_bn_cuda.py", "test_finalize_matches_reference_and_replays_in_a_cuda_graph", "0.1",
     "cuda: bn_finalize"),
    ("tests/ops/test_relu_mask.py", "test_cuda_kernel_matches_the_cpu_kernel", "True-dtype1", "cuda: relu_mask"),
    ("tests/ops/test_add_relu.py", "test_matches_eager_bitwise", "True-dtype1", "cuda: add_relu"),
    ("tests/backends/triton/test_triton_conv_cuda.py", "test_resnet50_shapes", "l1_3x3-bf16-256", "triton: conv + epilogues, "
     "a 3x3 at batch 256"),
    ("tests/backends/triton/test_triton_conv_cuda.py", "test_resnet50_shapes", "stem_7x7_s2-bf16-1", "triton: the stem's flat-K "
     "mode"),
    ("tests/backends/triton/test_triton_conv_cuda.py", "test_op_backward_on_gpu", None, "triton: conv op backward"),
    ("tests/backends/triton/test_triton_conv_cuda.py", "test_prologue_conv_and_its_fused_dgrad", "l1_3x3-bf16",
     "triton: BN prologue conv and its fused dgrad"),
    ("tests/backends/cudnn/test_cudnn.py", "test_conv_bias_act", "True-True-1-3-dtype1", "cudnn: conv + bias + residual + ReLU"),
    ("tests/backends/cudnn/test_cudnn.py", "test_conv_genstats", "True-dtype1", "cudnn: conv + statistics (prologue)"),
    ("tests/backends/cudnn/test_cudnn.py", "test_dgrad_wgrad", "dtype1", "cudnn: data and weight gradients"),
    ("tests/backends/cudnn/test_cudnn.py", "test_cudnn_blocks_train_like_the_reference_backend",
     "bf16-autocast-bottleneck-downsample", "cudnn: a training bottleneck"),
    ("tests/backends/triton/test_conv_prologue.py", "test_cuda_training_block_with_prologues_matches_eager", "bottleneck-s2-bf16",
     "triton: a training bottleneck with prologues"),
    ("tests/nn/test_fused_blocks.py", "test_model_matches_eager", "True-True-resnet50-cuda",
     "cuda (auto): resnet50 training, channels_last"),
]

# Built for the machine's own architecture only, so the check that reads the
# sm_80 half of the ptxas report cannot pass; test_large_tensors' tensors take
# tens of GiB beside the workers.
CUDA_TESTS_K = ("(cuda or cudnn or triton) and not large_tensors and not test_bn_kernels_built_for_sm80_and_sm90"
                " and not interp")
# The full profile: every test but those two.
ALL_TESTS_K = "not large_tensors and not test_bn_kernels_built_for_sm80_and_sm90"


def smoke_files() -> list[str]:
    return list(dict.fromkeys(f for f, _, _, _ in SMOKE))


def smoke_k() -> str:
    return " or ".join(name + (f"[{param}]" if param else "") for _, name, param, _ in SMOKE)
