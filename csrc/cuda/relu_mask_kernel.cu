// CUDA kernel of fused_resnet::relu_mask: byte b holds !(y <= 0) of elements
// 8b .. 8b+7 (bit k for element 8b + k), bn_apply's mask layout. As in
// bn_apply, each thread takes one 8-element group (128-bit loads where y is
// aligned) and writes its mask byte whole. Torch-free;
// csrc/cuda/relu_mask_cuda.cpp does the checks.
#include "bn_device.cuh"

namespace fused_resnet {
namespace {

using namespace bn;

template <typename T>
__global__ void relu_mask_kernel(const T* __restrict__ y, uint8_t* __restrict__ mask, int64_t n, bool vec) {
  using A = typename AccOf<T>::type;
  const int64_t groups = (n + kGroup - 1) / kGroup;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const int64_t i = g * kGroup;
    uint32_t bits = 0;
    // eager's threshold_backward keeps the gradient where !(y <= 0): NaN too.
    if (n - i >= kGroup) {
      const Group<T> yv = load_group(y, i, vec);
#pragma unroll
      for (int k = 0; k < kGroup; ++k) bits |= static_cast<uint32_t>(!(to_acc<A>(yv.v[k]) <= A(0))) << k;
    } else {
      for (int k = 0; i + k < n; ++k) bits |= static_cast<uint32_t>(!(to_acc<A>(y[i + k]) <= A(0))) << k;
    }
    mask[g] = static_cast<uint8_t>(bits);
  }
}

template <typename T>
void launch(const void* y, uint8_t* mask, int64_t n, int num_sms, cudaStream_t stream) {
  const int64_t groups = (n + kGroup - 1) / kGroup;
  relu_mask_kernel<T><<<grid_size(groups, kThreads, num_sms), kThreads, 0, stream>>>(static_cast<const T*>(y), mask,
                                                                                     n, aligned16(y));
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
