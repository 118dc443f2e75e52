// CUDA kernel of fused_resnet::relu_mask: byte b holds !(y <= 0) of elements
// 8b .. 8b+7 (bit k for element 8b + k), bn_apply's mask layout. One thread
// per byte: a warp reads 256 consecutive elements. Free of torch headers;
// csrc/cuda/relu_mask_cuda.cpp does the checks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"

namespace fused_resnet {
namespace {

template <typename T>
__device__ __forceinline__ float as_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float as_float(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double as_float(double v) { return v; }

template <typename T>
__global__ void relu_mask_kernel(const T* __restrict__ y, uint8_t* __restrict__ mask, int64_t n, int64_t nbytes) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < nbytes; b += stride) {
    const int64_t i0 = b * 8;
    const int count = n - i0 < 8 ? static_cast<int>(n - i0) : 8;
    uint32_t byte = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      // eager's threshold_backward keeps the gradient where !(y <= 0): NaN too.
      if (k < count && !(as_float(y[i0 + k]) <= 0)) byte |= 1u << k;
    }
    mask[b] = static_cast<uint8_t>(byte);
  }
}

template <typename T>
void launch(const void* y, uint8_t* mask, int64_t n, int num_sms, cudaStream_t stream) {
  const int64_t nbytes = (n + 7) / 8;
  const int threads = 256;
  relu_mask_kernel<T><<<grid_size(nbytes, threads, num_sms), threads, 0, stream>>>(static_cast<const T*>(y), mask,
                                                                                   n, nbytes);
}

}  // namespace

cudaError_t relu_mask_launch(DType dtype, const void* y, uint8_t* mask, int64_t n, int num_sms,
                             cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: launch<float>(y, mask, n, num_sms, stream); break;
    case DType::kFloat64: launch<double>(y, mask, n, num_sms, stream); break;
    case DType::kFloat16: launch<__half>(y, mask, n, num_sms, stream); break;
    case DType::kBFloat16: launch<__nv_bfloat16>(y, mask, n, num_sms, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace fused_resnet
