// The boundary between torch-free CUDA kernels (*.cu, fast to compile) and the
// torch glue (*_cuda.cpp): plain pointers, sizes, a dtype tag and a stream.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fused_resnet {

enum class DType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Enough blocks to fill the GPU a few times over, never more than the work.
inline int grid_size(int64_t work, int threads, int num_sms) {
  const int64_t wanted = (work + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(num_sms) * 8;
  const int64_t g = wanted < cap ? wanted : cap;
  return static_cast<int>(g > 0 ? g : 1);
}

cudaError_t add_relu_launch(DType dtype, const void* x, const void* r, void* y, int64_t n, int num_sms,
                            cudaStream_t stream);

}  // namespace fused_resnet
