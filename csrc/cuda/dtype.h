// Torch-side helpers for calling the torch-free launchers in launch.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "launch.h"

namespace fused_resnet {

inline DType to_kernel_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "fused_resnet: `", name, "` must be float32, float16, bfloat16 or float64, got ", t);
  }
}

inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

}  // namespace fused_resnet
