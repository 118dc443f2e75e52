// CUDA kernels of fused_resnet::bn_backward: the backward of bn_apply in two
// passes over memory.
//
// Pass 1 (reduction): per channel, sum(dy') and sum(dy' * (z - mean)) with
// dy' = dy masked by the ReLU mask; per-block partials, then a fixed-order
// combine kernel that also turns the sums into dbias, dweight and the
// per-channel coefficients of pass 2. Deterministic: no atomics.
// Pass 2 (elementwise, 8 elements = one mask byte per thread):
// dz = k * (dy' - (cb + (z - mean) * cw)), dresidual = dy'.
// Torch-free; bn_cuda.cpp does the checks.
#include <type_traits>

#include "bn_device.cuh"

namespace fused_resnet {
namespace {

using namespace bn;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Lanes {
  T v[VEC];
};

// The VEC mask bits of elements [i, i + VEC): VEC divides 8 and i is a
// multiple of VEC, so they sit in one byte. No mask means no ReLU: all kept.
template <int VEC>
__device__ __forceinline__ uint32_t mask_bits(const uint8_t* __restrict__ mask, int64_t i) {
  if (mask == nullptr) return 0xffu;
  return static_cast<uint32_t>(__ldg(mask + (i >> 3))) >> (i & 7);
}

// Pass 1, rows layout ([rows, C], channels_last).
template <typename T, typename D, int VEC>
__global__ __launch_bounds__(kThreads) void reduce_rows_kernel(
    const D* __restrict__ dy, const T* __restrict__ z, const uint8_t* __restrict__ mask,
    const typename AccOf<T>::type* __restrict__ mean, int64_t rows, int64_t C, int64_t per_block, int tx_count,
    typename AccOf<T>::type* __restrict__ part_g, typename AccOf<T>::type* __restrict__ part_gx) {
  using A = typename AccOf<T>::type;
  constexpr int kUnroll = 2;
  __shared__ A s_g[kThreads * VEC];
  __shared__ A s_gx[kThreads * VEC];

  const int tid = threadIdx.x;
  const int tx = tid % tx_count;
  const int ty = tid / tx_count;
  const int ty_count = kThreads / tx_count;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * tx_count + tx) * VEC;
  const bool active = c0 < C;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * per_block;
  const int64_t r1 = r0 + per_block < rows ? r0 + per_block : rows;

  A sg[VEC], sgx[VEC], mu[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    sg[v] = sgx[v] = A(0);
    mu[v] = active ? mean[c0 + v] : A(0);
  }
  if (active) {
    for (int64_t r = r0 + ty; r < r1; r += static_cast<int64_t>(ty_count) * kUnroll) {
      Lanes<D, VEC> gb[kUnroll];
      Lanes<T, VEC> zb[kUnroll];
      uint32_t mb[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t rr = r + static_cast<int64_t>(u) * ty_count;
        if (rr < r1) {
          const int64_t i = rr * C + c0;
          gb[u] = *reinterpret_cast<const Lanes<D, VEC>*>(dy + i);
          zb[u] = *reinterpret_cast<const Lanes<T, VEC>*>(z + i);
          mb[u] = mask_bits<VEC>(mask, i);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (r + static_cast<int64_t>(u) * ty_count < r1) {
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            // A select, not dy * bit: eager's threshold_backward turns a NaN
            // gradient at a masked position into 0.
            const A g = ((mb[u] >> v) & 1u) ? to_acc<A>(gb[u].v[v]) : A(0);
            sg[v] += g;
            sgx[v] += g * (to_acc<A>(zb[u].v[v]) - mu[v]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    s_g[tid * VEC + v] = sg[v];
    s_gx[tid * VEC + v] = sgx[v];
  }
  for (int stride = ty_count / 2; stride > 0; stride /= 2) {
    __syncthreads();
    if (ty < stride) {
      const int other = tid + stride * tx_count;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        sg[v] += s_g[other * VEC + v];
        sgx[v] += s_gx[other * VEC + v];
        s_g[tid * VEC + v] = sg[v];
        s_gx[tid * VEC + v] = sgx[v];
      }
    }
  }
  if (ty == 0 && active) {
    const int64_t base = static_cast<int64_t>(blockIdx.y) * C + c0;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      part_g[base + v] = sg[v];
      part_gx[base + v] = sgx[v];
    }
  }
}

// Pass 1, planes layout ([outer, C, inner], NCHW): block (c, p).
template <typename T, typename D, int VEC>
__global__ __launch_bounds__(kThreads) void reduce_planes_kernel(
    const D* __restrict__ dy, const T* __restrict__ z, const uint8_t* __restrict__ mask,
    const typename AccOf<T>::type* __restrict__ mean, int64_t units, int64_t C, int64_t inner, int64_t per_block,
    typename AccOf<T>::type* __restrict__ part_g, typename AccOf<T>::type* __restrict__ part_gx) {
  using A = typename AccOf<T>::type;
  __shared__ A s_g[kThreads / 32], s_gx[kThreads / 32];
  const int64_t c = blockIdx.x;
  const int64_t sv = inner / VEC;
  const int64_t u0 = static_cast<int64_t>(blockIdx.y) * per_block;
  const int64_t u1 = u0 + per_block < units ? u0 + per_block : units;
  const bool narrow = units < (int64_t(1) << 31);
  const A mu = mean[c];

  A sg = 0, sgx = 0;
  for (int64_t u = u0 + threadIdx.x; u < u1; u += kThreads) {
    int64_t q, s;
    if (narrow) {
      const uint32_t uu = static_cast<uint32_t>(u), svv = static_cast<uint32_t>(sv);
      q = uu / svv;
      s = uu - static_cast<uint32_t>(q) * svv;
    } else {
      q = u / sv;
      s = u - q * sv;
    }
    const int64_t i = (q * C + c) * inner + s * VEC;
    const Lanes<D, VEC> gv = *reinterpret_cast<const Lanes<D, VEC>*>(dy + i);
    const Lanes<T, VEC> zv = *reinterpret_cast<const Lanes<T, VEC>*>(z + i);
    const uint32_t bits = mask_bits<VEC>(mask, i);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const A g = ((bits >> v) & 1u) ? to_acc<A>(gv.v[v]) : A(0);
      sg += g;
      sgx += g * (to_acc<A>(zv.v[v]) - mu);
    }
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    sg += __shfl_xor_sync(0xffffffffu, sg, off);
    sgx += __shfl_xor_sync(0xffffffffu, sgx, off);
  }
  if (lane == 0) {
    s_g[warp] = sg;
    s_gx[warp] = sgx;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) {
      sg += s_g[w];
      sgx += s_gx[w];
    }
    part_g[static_cast<int64_t>(blockIdx.y) * C + c] = sg;
    part_gx[static_cast<int64_t>(blockIdx.y) * C + c] = sgx;
  }
}

// Combine: warp per channel, lanes over partial rows, fixed butterfly. Writes
// dbias, dweight and pass 2's coefficients k = w * invstd, cb = dbias / M and
// cw = dweight * invstd / M (zero without batch statistics).
template <typename A>
__global__ __launch_bounds__(kThreads) void combine_kernel(const A* __restrict__ part_g, const A* __restrict__ part_gx,
                                                           int partials, int64_t C, const A* __restrict__ invstd,
                                                           const A* __restrict__ weight, bool batch_stats,
                                                           A per_channel, A* __restrict__ dweight,
                                                           A* __restrict__ dbias, A* __restrict__ coef) {
  const int lane = threadIdx.x % 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (c >= C) return;
  A sg = 0, sgx = 0;
  for (int p = lane; p < partials; p += 32) {
    sg += part_g[p * C + c];
    sgx += part_gx[p * C + c];
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    sg += __shfl_xor_sync(0xffffffffu, sg, off);
    sgx += __shfl_xor_sync(0xffffffffu, sgx, off);
  }
  if (lane == 0) {
    const A is = invstd[c];
    const A dw = sgx * is;
    dbias[c] = sg;
    dweight[c] = dw;
    coef[c] = weight != nullptr ? weight[c] * is : is;
    coef[C + c] = batch_stats ? sg / per_channel : A(0);
    coef[2 * C + c] = batch_stats ? dw * is / per_channel : A(0);
  }
}

template <typename T, typename D, typename A>
__device__ __forceinline__ void backward_one(D dy, T z, uint32_t bit, A mu, A k, A cb, A cw, T& dz, D& dres) {
  const A g = bit ? to_acc<A>(dy) : A(0);
  dz = from_acc<T>(k * (g - (cb + (to_acc<A>(z) - mu) * cw)));
  dres = from_acc<D>(g);
}

// Pass 2: 8 consecutive elements per thread, one mask byte.
template <typename T, typename D, int MODE>
__global__ __launch_bounds__(kThreads, sizeof(T) == 8 ? 2 : 4) void grad_kernel(
    const D* __restrict__ dy, const T* __restrict__ z, const uint8_t* __restrict__ mask,
    const typename AccOf<T>::type* __restrict__ mean, const typename AccOf<T>::type* __restrict__ coef,
    T* __restrict__ dz, D* __restrict__ dres, int64_t n, int64_t C, int64_t inner, bool vec) {
  using A = typename AccOf<T>::type;
  const A* __restrict__ kk = coef;
  const A* __restrict__ cbb = coef + C;
  const A* __restrict__ cww = coef + 2 * C;
  const int64_t groups = (n + kGroup - 1) / kGroup;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t g0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t c_run = (g0 * kGroup) % C;
  const int64_t c_step = (stride * kGroup) % C;
  for (int64_t g = g0; g < groups; g += stride) {
    const int64_t i = g * kGroup;
    const int valid = n - i < kGroup ? static_cast<int>(n - i) : kGroup;
    const uint32_t bits = mask != nullptr ? static_cast<uint32_t>(mask[g]) : 0xffu;
    if (valid == kGroup) {
      const Group<D> gv = load_group(dy, i, vec);
      const Group<T> zv = load_group(z, i, vec);
      Group<T> dzv;
      Group<D> drv;
      if (MODE == static_cast<int>(ChannelMode::kRun)) {
        const Group<A> mu = load_group(mean, c_run, true);
        const Group<A> k = load_group(kk, c_run, true);
        const Group<A> cb = load_group(cbb, c_run, true);
        const Group<A> cw = load_group(cww, c_run, true);
#pragma unroll
        for (int e = 0; e < kGroup; ++e)
          backward_one(gv.v[e], zv.v[e], (bits >> e) & 1u, mu.v[e], k.v[e], cb.v[e], cw.v[e], dzv.v[e], drv.v[e]);
      } else if (MODE == static_cast<int>(ChannelMode::kSingle)) {
        const int64_t c = (i / inner) % C;
        const A mu = mean[c], k = kk[c], cb = cbb[c], cw = cww[c];
#pragma unroll
        for (int e = 0; e < kGroup; ++e)
          backward_one(gv.v[e], zv.v[e], (bits >> e) & 1u, mu, k, cb, cw, dzv.v[e], drv.v[e]);
      } else {
        ChannelCursor cur(i, C, inner);
#pragma unroll
        for (int e = 0; e < kGroup; ++e) {
          const int64_t c = cur.c;
          backward_one(gv.v[e], zv.v[e], (bits >> e) & 1u, mean[c], kk[c], cbb[c], cww[c], dzv.v[e], drv.v[e]);
          cur.next(C, inner);
        }
      }
      store_group(dz, i, vec, dzv);
      if (dres != nullptr) store_group(dres, i, vec, drv);
    } else {
      ChannelCursor cur(i, C, inner);
#pragma unroll 1  // the last group only
      for (int e = 0; e < valid; ++e) {
        const int64_t c = cur.c;
        T out;
        D r;
        backward_one(dy[i + e], z[i + e], (bits >> e) & 1u, mean[c], kk[c], cbb[c], cww[c], out, r);
        dz[i + e] = out;
        if (dres != nullptr) dres[i + e] = r;
        cur.next(C, inner);
      }
    }
    if (MODE == static_cast<int>(ChannelMode::kRun)) {
      c_run += c_step;
      if (c_run >= C) c_run -= C;
    }
  }
}

struct Args {
  const void* dy;
  const void* z;
  const uint8_t* mask;
  const void* mean;
  const void* invstd;
  const void* weight;
  bool batch_stats;
  void* partials;
  void* coef;
  void* dz;
  void* dres;
  void* dweight;
  void* dbias;
  BnShape s;
  int num_sms;
  cudaStream_t stream;
};

template <typename T, typename D, int VEC>
void launch_reduce(const Args& a, const BnReducePlan& p, typename AccOf<T>::type* pg,
                   typename AccOf<T>::type* pgx) {
  using A = typename AccOf<T>::type;
  const dim3 grid(p.grid_x, p.partials);
  if (p.rows_layout) {
    reduce_rows_kernel<T, D, VEC><<<grid, kThreads, 0, a.stream>>>(
        static_cast<const D*>(a.dy), static_cast<const T*>(a.z), a.mask, static_cast<const A*>(a.mean), a.s.outer,
        a.s.channels, p.per_block, p.tx, pg, pgx);
  } else {
    reduce_planes_kernel<T, D, VEC><<<grid, kThreads, 0, a.stream>>>(
        static_cast<const D*>(a.dy), static_cast<const T*>(a.z), a.mask, static_cast<const A*>(a.mean), p.units,
        a.s.channels, a.s.inner, p.per_block, pg, pgx);
  }
}

template <typename T, typename D, int MODE>
void launch_grad(const Args& a, bool vec) {
  using A = typename AccOf<T>::type;
  const int64_t n = a.s.numel();
  const int blocks = grid_size((n + kGroup - 1) / kGroup, kThreads, a.num_sms);
  grad_kernel<T, D, MODE><<<blocks, kThreads, 0, a.stream>>>(
      static_cast<const D*>(a.dy), static_cast<const T*>(a.z), a.mask, static_cast<const A*>(a.mean),
      static_cast<const A*>(a.coef), static_cast<T*>(a.dz), static_cast<D*>(a.dres), n, a.s.channels, a.s.inner,
      vec);
}

// Pass 1 and the combine: dbias, dweight and pass 2's coefficients.
template <typename T, typename D>
void launch_pass1(const Args& a) {
  using A = typename AccOf<T>::type;
  constexpr bool kSame = std::is_same<T, D>::value;
  constexpr int kVec = 16 / sizeof(T);
  const BnShape& s = a.s;
  const bool aligned = aligned16(a.dy) && aligned16(a.z);
  const bool rows = s.inner == 1;
  // Mixed dy/z dtypes are rare: scalar lanes serve them.
  const bool lanes = kSame && aligned && (rows ? s.channels % kVec == 0 : s.inner % kVec == 0);
  const BnReducePlan p = bn_reduce_plan(s, lanes ? kVec : 1, a.num_sms);
  A* pg = static_cast<A*>(a.partials);
  A* pgx = pg + bn_max_partials(a.num_sms) * s.channels;
  if constexpr (kSame) {
    if (lanes)
      launch_reduce<T, D, kVec>(a, p, pg, pgx);
    else
      launch_reduce<T, D, 1>(a, p, pg, pgx);
  } else {
    launch_reduce<T, D, 1>(a, p, pg, pgx);
  }
  const int combine_blocks = static_cast<int>(bn_div_up(s.channels, kThreads / 32));
  combine_kernel<A><<<combine_blocks, kThreads, 0, a.stream>>>(
      pg, pgx, p.partials, s.channels, static_cast<const A*>(a.invstd), static_cast<const A*>(a.weight),
      a.batch_stats, static_cast<A>(s.outer * s.inner), static_cast<A*>(a.dweight), static_cast<A*>(a.dbias),
      static_cast<A*>(a.coef));
}

// Pass 2 from the coefficients in a.coef.
template <typename T, typename D>
void launch_pass2(const Args& a) {
  using A = typename AccOf<T>::type;
  constexpr bool kSame = std::is_same<T, D>::value;
  const BnShape& s = a.s;
  const bool rows = s.inner == 1;
  const bool vec = aligned16(a.dy) && aligned16(a.z) && aligned16(a.dz) && (a.dres == nullptr || aligned16(a.dres));
  if constexpr (kSame) {
    if (rows && s.channels % kGroup == 0 && aligned16(a.mean) && aligned16(a.coef) &&
        (s.channels * sizeof(A)) % 16 == 0) {
      launch_grad<T, D, static_cast<int>(ChannelMode::kRun)>(a, vec);
      return;
    }
    if (s.inner % kGroup == 0) {
      launch_grad<T, D, static_cast<int>(ChannelMode::kSingle)>(a, vec);
      return;
    }
  }
  launch_grad<T, D, static_cast<int>(ChannelMode::kWalk)>(a, vec);
}

// Which passes a launch runs.
enum class Passes { kBoth, kReduce, kElemt };

template <typename T, typename D>
void launch_typed(const Args& a, Passes passes) {
  if (passes != Passes::kElemt) launch_pass1<T, D>(a);
  if (passes != Passes::kReduce) launch_pass2<T, D>(a);
}

template <typename T>
void launch_dy(DType dy_dtype, const Args& a, Passes passes) {
  switch (dy_dtype) {
    case DType::kFloat32: launch_typed<T, float>(a, passes); break;
    case DType::kFloat64: launch_typed<T, double>(a, passes); break;
    case DType::kFloat16: launch_typed<T, __half>(a, passes); break;
    case DType::kBFloat16: launch_typed<T, __nv_bfloat16>(a, passes); break;
  }
}

cudaError_t launch_all(DType z_dtype, DType dy_dtype, const Args& a, Passes passes) {
  // The glue returns zeros for empty inputs; nothing to launch.
  if (a.s.numel() == 0) return cudaSuccess;
  switch (z_dtype) {
    case DType::kFloat32: launch_dy<float>(dy_dtype, a, passes); break;
    case DType::kFloat64: launch_dy<double>(dy_dtype, a, passes); break;
    case DType::kFloat16: launch_dy<__half>(dy_dtype, a, passes); break;
    case DType::kBFloat16: launch_dy<__nv_bfloat16>(dy_dtype, a, passes); break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t bn_backward_launch(DType z_dtype, DType dy_dtype, const void* dy, const void* z, const uint8_t* mask,
                               const void* mean, const void* invstd, const void* weight, bool batch_stats,
                               void* partials, void* coef, void* dz, void* dresidual, void* dweight, void* dbias,
                               BnShape shape, int num_sms, cudaStream_t stream) {
  const Args a{dy,      z,    mask, mean,      invstd,  weight, batch_stats, partials,
               coef,    dz,   dresidual, dweight, dbias, shape,  num_sms,     stream};
  return launch_all(z_dtype, dy_dtype, a, Passes::kBoth);
}

cudaError_t bn_backward_reduce_launch(DType z_dtype, DType dy_dtype, const void* dy, const void* z,
                                      const uint8_t* mask, const void* mean, const void* invstd, void* partials,
                                      void* coef, void* sum_dy, void* sum_dy_xhat, BnShape shape, int num_sms,
                                      cudaStream_t stream) {
  // The combine's dbias/dweight are exactly sum dy' and sum dy' * xhat.
  const Args a{dy,      z,       mask,    mean,        invstd, nullptr, false,   partials,
               coef,    nullptr, nullptr, sum_dy_xhat, sum_dy, shape,   num_sms, stream};
  return launch_all(z_dtype, dy_dtype, a, Passes::kReduce);
}

cudaError_t bn_backward_elemt_launch(DType z_dtype, DType dy_dtype, const void* dy, const void* z,
                                     const uint8_t* mask, const void* mean, const void* coef, void* dz,
                                     void* dresidual, BnShape shape, int num_sms, cudaStream_t stream) {
  const Args a{dy,      z,  mask,      mean,    nullptr, nullptr, true,    nullptr,
               const_cast<void*>(coef), dz, dresidual, nullptr, nullptr, shape,   num_sms, stream};
  return launch_all(z_dtype, dy_dtype, a, Passes::kElemt);
}

}  // namespace fused_resnet
