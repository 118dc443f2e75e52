// CUDA kernels of fused_resnet::bn_stats: per-channel mean and biased variance.
//
// Stage 1 keeps a Welford state per thread and channel lane (one count shared
// by the lanes of a 128-bit vector, so one division per vector), merges the
// block's states with Chan's formula in a fixed tree order and writes one
// partial per (partial row, channel). Stage 2 merges each channel's partial
// rows in a fixed order. No atomics anywhere: the result is bitwise
// reproducible on a given GPU. Torch-free; bn_cuda.cpp does the checks.
#include "bn_device.cuh"

namespace fused_resnet {
namespace {

using namespace bn;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Lanes {
  T v[VEC];
};

// Every value of channel c is accumulated minus K_c = z[0, c, 0] (its first
// element): variance is shift-invariant, and for data with a large mean and a
// small spread x - K_c is exact, which keeps fp32 Welford accurate where the
// mean alone would eat the digits. Non-finite K_c falls back to 0, so NaN/Inf
// propagate as without the shift. Callers only read it when z is non-empty.
template <typename T>
__device__ __forceinline__ typename AccOf<T>::type channel_shift(const T* __restrict__ z, int64_t c, int64_t inner) {
  using A = typename AccOf<T>::type;
  const A k = to_acc<A>(z[c * inner]);
  return isfinite(k) ? k : A(0);
}

// Rows layout ([rows, C], channels_last): thread (tx, ty) owns channels
// [cg * VEC, cg * VEC + VEC) and walks rows ty, ty + ty_count, ...
template <typename T, int VEC>
__global__ __launch_bounds__(kThreads) void stats_rows_kernel(const T* __restrict__ z, int64_t rows, int64_t C,
                                                              int64_t per_block, int tx_count,
                                                              typename AccOf<T>::type* __restrict__ part_mean,
                                                              typename AccOf<T>::type* __restrict__ part_m2) {
  using A = typename AccOf<T>::type;
  constexpr int kUnroll = 4;
  __shared__ A s_n[kThreads];
  __shared__ A s_mean[kThreads * VEC];
  __shared__ A s_m2[kThreads * VEC];

  const int tid = threadIdx.x;
  const int tx = tid % tx_count;
  const int ty = tid / tx_count;
  const int ty_count = kThreads / tx_count;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * tx_count + tx) * VEC;
  const bool active = c0 < C;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * per_block;
  const int64_t r1 = r0 + per_block < rows ? r0 + per_block : rows;

  A n = 0;
  A mean[VEC], m2[VEC], shift[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) mean[v] = m2[v] = shift[v] = A(0);

  if (active && rows > 0) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) shift[v] = channel_shift(z, c0 + v, 1);
    for (int64_t r = r0 + ty; r < r1; r += static_cast<int64_t>(ty_count) * kUnroll) {
      // Issue all loads before the dependent arithmetic: bytes in flight.
      Lanes<T, VEC> buf[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t rr = r + static_cast<int64_t>(u) * ty_count;
        if (rr < r1) buf[u] = *reinterpret_cast<const Lanes<T, VEC>*>(z + rr * C + c0);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (r + static_cast<int64_t>(u) * ty_count < r1) {
          n += A(1);
          const A inv = A(1) / n;
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            const A x = to_acc<A>(buf[u].v[v]) - shift[v];
            const A d = x - mean[v];
            mean[v] += d * inv;
            m2[v] += d * (x - mean[v]);
          }
        }
      }
    }
  }

  s_n[tid] = n;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    s_mean[tid * VEC + v] = mean[v];
    s_m2[tid * VEC + v] = m2[v];
  }
  // Tree over the row dimension, fixed order.
  for (int stride = ty_count / 2; stride > 0; stride /= 2) {
    __syncthreads();
    if (ty < stride) {
      const int other = tid + stride * tx_count;
      const A nb = s_n[other];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        A nn = n;
        chan_merge(nn, mean[v], m2[v], nb, s_mean[other * VEC + v], s_m2[other * VEC + v]);
        s_mean[tid * VEC + v] = mean[v];
        s_m2[tid * VEC + v] = m2[v];
      }
      n += nb;
      s_n[tid] = n;
    }
  }
  if (ty == 0 && active) {
    const int64_t base = static_cast<int64_t>(blockIdx.y) * C + c0;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      part_mean[base + v] = mean[v];
      part_m2[base + v] = m2[v];
    }
  }
}

// Merge a full block's states (all threads hold one channel) in a fixed order;
// thread 0 ends with the block's state.
template <typename A>
__device__ __forceinline__ void block_merge(A& n, A& mean, A& m2) {
  __shared__ A s_n[kThreads / 32], s_mean[kThreads / 32], s_m2[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    const A nb = __shfl_xor_sync(0xffffffffu, n, off);
    const A mb = __shfl_xor_sync(0xffffffffu, mean, off);
    const A qb = __shfl_xor_sync(0xffffffffu, m2, off);
    chan_merge(n, mean, m2, nb, mb, qb);
  }
  if (lane == 0) {
    s_n[warp] = n;
    s_mean[warp] = mean;
    s_m2[warp] = m2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) chan_merge(n, mean, m2, s_n[w], s_mean[w], s_m2[w]);
  }
}

// Planes layout ([outer, C, inner], NCHW): block (c, p) reduces channel c over
// vector units [p * per_block, (p + 1) * per_block); unit u is VEC elements at
// (u / (inner / VEC), u % (inner / VEC)).
template <typename T, int VEC>
__global__ __launch_bounds__(kThreads) void stats_planes_kernel(const T* __restrict__ z, int64_t units, int64_t C,
                                                                int64_t inner, int64_t per_block,
                                                                typename AccOf<T>::type* __restrict__ part_mean,
                                                                typename AccOf<T>::type* __restrict__ part_m2) {
  using A = typename AccOf<T>::type;
  const int64_t c = blockIdx.x;
  const int64_t sv = inner / VEC;
  const int64_t u0 = static_cast<int64_t>(blockIdx.y) * per_block;
  const int64_t u1 = u0 + per_block < units ? u0 + per_block : units;
  const bool narrow = units < (int64_t(1) << 31);

  A n = 0;
  A mean[VEC], m2[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) mean[v] = m2[v] = A(0);
  const A shift = units > 0 ? channel_shift(z, c, inner) : A(0);
  for (int64_t u = u0 + threadIdx.x; u < u1; u += kThreads) {
    int64_t q, s;
    if (narrow) {  // 32-bit division where it suffices: far cheaper
      const uint32_t uu = static_cast<uint32_t>(u), svv = static_cast<uint32_t>(sv);
      q = uu / svv;
      s = uu - static_cast<uint32_t>(q) * svv;
    } else {
      q = u / sv;
      s = u - q * sv;
    }
    const Lanes<T, VEC> x = *reinterpret_cast<const Lanes<T, VEC>*>(z + (q * C + c) * inner + s * VEC);
    n += A(1);
    const A inv = A(1) / n;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const A xv = to_acc<A>(x.v[v]) - shift;
      const A d = xv - mean[v];
      mean[v] += d * inv;
      m2[v] += d * (xv - mean[v]);
    }
  }
  // Fold the lanes (equal counts) into lane 0's state, then the block.
  A tn = n, tmean = mean[0], tm2 = m2[0];
#pragma unroll
  for (int v = 1; v < VEC; ++v) chan_merge(tn, tmean, tm2, n, mean[v], m2[v]);
  block_merge(tn, tmean, tm2);
  if (threadIdx.x == 0) {
    part_mean[static_cast<int64_t>(blockIdx.y) * C + c] = tmean;
    part_m2[static_cast<int64_t>(blockIdx.y) * C + c] = tm2;
  }
}

// Stage 2: warp w of block b merges channel b * 8 + w's partial rows; lane j
// takes rows j, j + 32, ... and the lanes meet in a fixed butterfly. The
// partial means are of z - K_c: K_c is added back here.
template <typename T, typename A = typename AccOf<T>::type>
__global__ __launch_bounds__(kThreads) void stats_combine_kernel(const T* __restrict__ z, int64_t inner,
                                                                 const A* __restrict__ part_mean,
                                                                 const A* __restrict__ part_m2, int partials,
                                                                 int64_t C, int64_t units, int64_t per_block,
                                                                 int unit_elems, A* __restrict__ mean_out,
                                                                 A* __restrict__ var_out) {
  const int lane = threadIdx.x % 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (c >= C) return;  // whole warps leave together
  // The merge runs in double whatever A is: with fp32 the counts lose
  // integer precision past 2^24, and `shift + mean` would round the mean to
  // the shift's ulp (2^-18 for a shift of 48), far coarser than the data's
  // own precision near a mean of 0. The CPU path merges in double too.
  double n = 0, mean = 0, m2 = 0;
  for (int p = lane; p < partials; p += 32) {
    const int64_t first = static_cast<int64_t>(p) * per_block;
    const int64_t last = first + per_block < units ? first + per_block : units;
    const double nb = static_cast<double>((last - first) * unit_elems);
    chan_merge(n, mean, m2, nb, static_cast<double>(part_mean[p * C + c]), static_cast<double>(part_m2[p * C + c]));
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    const double nb = __shfl_xor_sync(0xffffffffu, n, off);
    const double mb = __shfl_xor_sync(0xffffffffu, mean, off);
    const double qb = __shfl_xor_sync(0xffffffffu, m2, off);
    chan_merge(n, mean, m2, nb, mb, qb);
  }
  if (lane == 0) {
    // torch.var_mean of no values is NaN, NaN.
    mean_out[c] = n > 0.0 ? static_cast<A>(static_cast<double>(channel_shift(z, c, inner)) + mean) : quiet_nan<A>();
    var_out[c] = n > 0.0 ? static_cast<A>(m2 / n) : quiet_nan<A>();
  }
}

template <typename T>
cudaError_t launch(const void* zv, BnShape s, void* partials, void* mean, void* var, int num_sms,
                   cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  constexpr int kVec = 16 / sizeof(T);
  const T* z = static_cast<const T*>(zv);
  const bool aligned = aligned16(zv);
  const bool rows = s.inner == 1;
  const int vec = aligned && (rows ? s.channels % kVec == 0 : s.inner % kVec == 0) ? kVec : 1;
  const BnReducePlan p = bn_reduce_plan(s, vec, num_sms);
  A* pm = static_cast<A*>(partials);
  A* pq = pm + static_cast<int64_t>(bn_max_partials(num_sms)) * s.channels;
  const dim3 grid(p.grid_x, p.partials);
  if (rows) {
    if (vec > 1)
      stats_rows_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(z, s.outer, s.channels, p.per_block, p.tx, pm, pq);
    else
      stats_rows_kernel<T, 1><<<grid, kThreads, 0, stream>>>(z, s.outer, s.channels, p.per_block, p.tx, pm, pq);
  } else {
    if (vec > 1)
      stats_planes_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(z, p.units, s.channels, s.inner, p.per_block, pm,
                                                                  pq);
    else
      stats_planes_kernel<T, 1><<<grid, kThreads, 0, stream>>>(z, p.units, s.channels, s.inner, p.per_block, pm, pq);
  }
  const int unit_elems = rows ? 1 : vec;
  const int combine_blocks = static_cast<int>(bn_div_up(s.channels, kThreads / 32));
  stats_combine_kernel<T><<<combine_blocks, kThreads, 0, stream>>>(z, s.inner, pm, pq, p.partials, s.channels, p.units,
                                                                   p.per_block, unit_elems, static_cast<A*>(mean),
                                                                   static_cast<A*>(var));
  return cudaGetLastError();
}

}  // namespace

cudaError_t bn_stats_launch(DType z_dtype, const void* z, BnShape shape, void* partials, void* mean, void* var,
                            int num_sms, cudaStream_t stream) {
  if (shape.channels == 0) return cudaSuccess;
  switch (z_dtype) {
    case DType::kFloat32: return launch<float>(z, shape, partials, mean, var, num_sms, stream);
    case DType::kFloat64: return launch<double>(z, shape, partials, mean, var, num_sms, stream);
    case DType::kFloat16: return launch<__half>(z, shape, partials, mean, var, num_sms, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(z, shape, partials, mean, var, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fused_resnet
