// CUDA kernel of fused_resnet::add_relu. Deliberately free of torch headers so
// nvcc compiles it in seconds; csrc/cuda/add_relu_cuda.cpp does the checks
// and the dispatch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"

namespace fused_resnet {
namespace {

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ T add_relu_one(T x, T r) {
  // Round the sum to T first, as eager does; fmaxf would drop NaN.
  const float v = to_float(from_float<T>(to_float(x) + to_float(r)));
  return from_float<T>(v < 0.f ? 0.f : v);
}
template <>
__device__ __forceinline__ double add_relu_one(double x, double r) {
  const double v = x + r;
  return v < 0.0 ? 0.0 : v;
}

// 16-byte vectors where every pointer is aligned, scalar tail otherwise.
template <typename T>
__global__ void add_relu_kernel(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ y, int64_t n,
                                bool vectorised) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vectorised) {
    const int64_t nvec = n / kVec;
    for (int64_t v = tid; v < nvec; v += stride) {
      uint4 xv = reinterpret_cast<const uint4*>(x)[v];
      uint4 rv = reinterpret_cast<const uint4*>(r)[v];
      uint4 yv;
      const T* xs = reinterpret_cast<const T*>(&xv);
      const T* rs = reinterpret_cast<const T*>(&rv);
      T* ys = reinterpret_cast<T*>(&yv);
#pragma unroll
      for (int k = 0; k < kVec; ++k) ys[k] = add_relu_one(xs[k], rs[k]);
      reinterpret_cast<uint4*>(y)[v] = yv;
    }
    done = nvec * kVec;
  }
  for (int64_t i = done + tid; i < n; i += stride) y[i] = add_relu_one(x[i], r[i]);
}

template <typename T>
void launch(const void* x, const void* r, void* y, int64_t n, int num_sms, cudaStream_t stream) {
  const bool vectorised = aligned16(x) && aligned16(r) && aligned16(y);
  const int threads = 256;
  const int64_t work = vectorised ? (n + 16 / sizeof(T) - 1) / (16 / sizeof(T)) : n;
  const int blocks = grid_size(work, threads, num_sms);
  add_relu_kernel<T><<<blocks, threads, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(r),
                                                     static_cast<T*>(y), n, vectorised);
}

}  // namespace

cudaError_t add_relu_launch(DType dtype, const void* x, const void* r, void* y, int64_t n, int num_sms,
                            cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: launch<float>(x, r, y, n, num_sms, stream); break;
    case DType::kFloat64: launch<double>(x, r, y, n, num_sms, stream); break;
    case DType::kFloat16: launch<__half>(x, r, y, n, num_sms, stream); break;
    case DType::kBFloat16: launch<__nv_bfloat16>(x, r, y, n, num_sms, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace fused_resnet
