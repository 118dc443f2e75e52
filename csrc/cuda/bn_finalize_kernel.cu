// CUDA kernel of fused_resnet::bn_finalize: scale/shift/invstd from batch
// statistics and PyTorch's running-statistic update, all on the device.
//
// One block: thread 0 alone increments num_batches_tracked and derives the
// momentum=None factor from the new value, so there is no host
// synchronisation and no cross-block race (CUDA-graph safe). Rounding points
// follow fused_resnet/ops/reference.py: Python scalars are rounded to the
// tensor's math type, and every multiply and add rounds separately.
// Torch-free; bn_cuda.cpp does the checks.
#include "bn_device.cuh"

namespace fused_resnet {
namespace {

using namespace bn;

// Optional parameters come in any floating dtype: a uniform switch per load
// is nothing next to a launch, and saves a template per dtype combination.
__device__ __forceinline__ double load_any(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kFloat64: return static_cast<const double*>(p)[i];
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
  return 0.0;
}

// Rounds v (already a value of the running dtype's math type) to dt.
__device__ __forceinline__ void store_any(void* p, DType dt, int64_t i, double v) {
  switch (dt) {
    case DType::kFloat32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case DType::kFloat64: static_cast<double*>(p)[i] = v; break;
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v)); break;
    case DType::kBFloat16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v));
      break;
  }
}

// running = running * (1 - factor) + factor * batch, in M (the running
// tensor's math type: double for fp64, else float), batch first rounded to
// the running dtype as `.to(running.dtype)` does.
template <typename M>
__device__ __forceinline__ double blend(double running, double batch, DType dt, double factor) {
  double rounded_batch;
  switch (dt) {
    case DType::kFloat16: rounded_batch = __half2float(__float2half_rn(static_cast<float>(batch))); break;
    case DType::kBFloat16: rounded_batch = __bfloat162float(__float2bfloat16_rn(static_cast<float>(batch))); break;
    case DType::kFloat32: rounded_batch = static_cast<float>(batch); break;
    default: rounded_batch = batch; break;
  }
  const M kept = mul_rn(static_cast<M>(running), static_cast<M>(1.0 - factor));
  return add_rn(kept, mul_rn(static_cast<M>(factor), static_cast<M>(rounded_batch)));
}

template <typename A>
__global__ __launch_bounds__(kThreads) void finalize_kernel(const A* __restrict__ mean, const A* __restrict__ var,
                                                            int64_t C, int64_t count, BnParam weight, BnParam bias,
                                                            void* running_mean, void* running_var, DType rdt,
                                                            int64_t* num_batches_tracked, bool has_momentum,
                                                            double momentum, double eps, A* __restrict__ scale,
                                                            A* __restrict__ shift, A* __restrict__ invstd) {
  __shared__ double s_factor;
  if (threadIdx.x == 0) {
    int64_t tracked = 0;
    if (num_batches_tracked != nullptr) {
      tracked = *num_batches_tracked + 1;
      *num_batches_tracked = tracked;
    }
    s_factor = has_momentum ? momentum : (num_batches_tracked != nullptr ? 1.0 / static_cast<double>(tracked) : 0.0);
  }
  __syncthreads();
  const double factor = s_factor;
  const A unbias = static_cast<A>(count > 1 ? static_cast<double>(count) / static_cast<double>(count - 1) : 1.0);
  const A eps_a = static_cast<A>(eps);

  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const A m = mean[c], v = var[c];
    const A is = A(1) / sqrt(add_rn(v, eps_a));
    const A sc = weight.ptr != nullptr ? mul_rn(static_cast<A>(load_any(weight.ptr, weight.dtype, c)), is) : is;
    A sh = mul_rn(-m, sc);
    if (bias.ptr != nullptr) sh = add_rn(sh, static_cast<A>(load_any(bias.ptr, bias.dtype, c)));
    invstd[c] = is;
    scale[c] = sc;
    shift[c] = sh;
    if (running_mean != nullptr) {
      const double rm = load_any(running_mean, rdt, c), rv = load_any(running_var, rdt, c);
      const double unbiased = count > 1 ? static_cast<double>(mul_rn(v, unbias)) : static_cast<double>(v);
      if (rdt == DType::kFloat64) {
        store_any(running_mean, rdt, c, blend<double>(rm, m, rdt, factor));
        store_any(running_var, rdt, c, blend<double>(rv, unbiased, rdt, factor));
      } else {
        store_any(running_mean, rdt, c, blend<float>(rm, m, rdt, factor));
        store_any(running_var, rdt, c, blend<float>(rv, unbiased, rdt, factor));
      }
    }
  }
}

}  // namespace

cudaError_t bn_finalize_launch(DType stat_dtype, const void* mean, const void* var, int64_t channels, int64_t count,
                               BnParam weight, BnParam bias, void* running_mean, void* running_var,
                               DType running_dtype, int64_t* num_batches_tracked, bool has_momentum,
                               double momentum, double eps, void* scale, void* shift, void* invstd,
                               cudaStream_t stream) {
  // Launch even for C == 0: num_batches_tracked still counts the batch.
  if (running_var == nullptr) running_mean = nullptr;
  if (stat_dtype == DType::kFloat64) {
    finalize_kernel<double><<<1, kThreads, 0, stream>>>(
        static_cast<const double*>(mean), static_cast<const double*>(var), channels, count, weight, bias,
        running_mean, running_var, running_dtype, num_batches_tracked, has_momentum, momentum, eps,
        static_cast<double*>(scale), static_cast<double*>(shift), static_cast<double*>(invstd));
  } else {
    finalize_kernel<float><<<1, kThreads, 0, stream>>>(
        static_cast<const float*>(mean), static_cast<const float*>(var), channels, count, weight, bias,
        running_mean, running_var, running_dtype, num_batches_tracked, has_momentum, momentum, eps,
        static_cast<float*>(scale), static_cast<float*>(shift), static_cast<float*>(invstd));
  }
  return cudaGetLastError();
}

}  // namespace fused_resnet
