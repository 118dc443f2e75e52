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

// Packed ReLU mask !(y <= 0) of n elements into ceil(n / 8) bytes (relu_mask_kernel.cu).
cudaError_t relu_mask_launch(DType dtype, const void* y, uint8_t* mask, int64_t n, int num_sms,
                             cudaStream_t stream);

// ---- BatchNorm (bn_*_kernel.cu) ----------------------------------------------

// z as laid out in memory: [outer, C, inner]. Channels_last (and 2-D) data is
// inner == 1 with outer = N*H*W; contiguous NCHW is outer = N, inner = H*W.
struct BnShape {
  int64_t outer;
  int64_t channels;
  int64_t inner;
  int64_t numel() const { return outer * channels * inner; }
};

// An optional per-channel tensor of any floating dtype (ptr == nullptr: absent).
struct BnParam {
  const void* ptr;
  DType dtype;
};

// Rows of the per-channel partial buffers the reductions need: the glue
// allocates [2, bn_max_partials(num_sms), C] in the statistics dtype.
inline int64_t bn_max_partials(int num_sms) { return static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * 4; }

// mean/var (C, statistics dtype) of z, biased variance, Welford per thread,
// Chan merges in a fixed order (deterministic, no atomics).
cudaError_t bn_stats_launch(DType z_dtype, const void* z, BnShape shape, void* partials, void* mean, void* var,
                            int num_sms, cudaStream_t stream);

// One block: scale/shift/invstd from mean/var and the in-place running-stat
// update; num_batches_tracked is incremented and read on the device.
// running_mean/running_var must be contiguous, or both null.
cudaError_t bn_finalize_launch(DType stat_dtype, const void* mean, const void* var, int64_t channels, int64_t count,
                               BnParam weight, BnParam bias, void* running_mean, void* running_var,
                               DType running_dtype, int64_t* num_batches_tracked, bool has_momentum,
                               double momentum, double eps, void* scale, void* shift, void* invstd,
                               cudaStream_t stream);

// y = [relu](z * scale + shift [+ residual]) in y_dtype, mask = packed (y > 0)
// when relu. residual (may be null) has z's dtype and layout; scale/shift are
// in the statistics dtype; mask has ceil(numel / 8) bytes.
cudaError_t bn_apply_launch(DType z_dtype, DType y_dtype, const void* z, const void* scale, const void* shift,
                            const void* residual, bool relu, void* y, uint8_t* mask, BnShape shape, int num_sms,
                            cudaStream_t stream);

// Backward of bn_apply. mask may be null (no ReLU); weight (statistics dtype)
// may be null (= 1); dresidual may be null. partials: as for bn_stats;
// coef: 3 * C values of the statistics dtype (workspace).
cudaError_t bn_backward_launch(DType z_dtype, DType dy_dtype, const void* dy, const void* z, const uint8_t* mask,
                               const void* mean, const void* invstd, const void* weight, bool batch_stats,
                               void* partials, void* coef, void* dz, void* dresidual, void* dweight, void* dbias,
                               BnShape shape, int num_sms, cudaStream_t stream);

// bn_backward's two passes run apart, for synchronised BatchNorm. The reduce
// writes sum dy' and sum dy' * xhat (statistics dtype, C each; coef is
// workspace); the elemt pass reads coef = [k, cb, cw] (3 * C values: dz =
// k * (dy' - (cb + (z - mean) * cw))) computed from the all-reduced sums.
cudaError_t bn_backward_reduce_launch(DType z_dtype, DType dy_dtype, const void* dy, const void* z,
                                      const uint8_t* mask, const void* mean, const void* invstd, void* partials,
                                      void* coef, void* sum_dy, void* sum_dy_xhat, BnShape shape, int num_sms,
                                      cudaStream_t stream);
cudaError_t bn_backward_elemt_launch(DType z_dtype, DType dy_dtype, const void* dy, const void* z,
                                     const uint8_t* mask, const void* mean, const void* coef, void* dz,
                                     void* dresidual, BnShape shape, int num_sms, cudaStream_t stream);

}  // namespace fused_resnet
