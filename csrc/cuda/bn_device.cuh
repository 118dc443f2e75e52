// Device helpers shared by the BatchNorm kernels (bn_*_kernel.cu): dtype
// conversions with explicit rounding points, 8-element groups loaded with
// 128-bit accesses, Welford/Chan merging, and the reduction plan. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"

namespace fused_resnet {
namespace bn {

constexpr int kThreads = 256;
// Elementwise kernels give each thread 8 consecutive elements in memory order:
// exactly one mask byte, so mask bytes are written whole, never shared.
constexpr int kGroup = 8;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// ---- conversions -------------------------------------------------------

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(double v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename A, typename T>
__device__ __forceinline__ A to_acc(T v) {
  return static_cast<A>(to_f(v));
}
template <>
__device__ __forceinline__ double to_acc<double, double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ float to_acc<float, float>(float v) {
  return v;
}

template <typename O>
__device__ __forceinline__ O from_f(float v) {
  return static_cast<O>(v);
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Round an accumulator value to O. Like c10's conversions, a double reaches a
// 16-bit type through float.
template <typename O, typename A>
__device__ __forceinline__ O from_acc(A v) {
  return from_f<O>(static_cast<float>(v));
}
template <>
__device__ __forceinline__ double from_acc<double, double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ double from_acc<double, float>(float v) {
  return static_cast<double>(v);
}

// T -> O as torch's .to(): exact through double when either side is double.
template <typename O, typename T>
__device__ __forceinline__ O convert(T v) {
  return from_acc<O>(to_f(v));
}
template <>
__device__ __forceinline__ double convert<double, double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ float convert<float, double>(double v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ __half convert<__half, double>(double v) {
  return __float2half_rn(static_cast<float>(v));
}
template <>
__device__ __forceinline__ __nv_bfloat16 convert<__nv_bfloat16, double>(double v) {
  return __float2bfloat16_rn(static_cast<float>(v));
}

// Separate multiply and add with no FMA contraction: the reference (eager
// ops) rounds after each, and matching it bit for bit keeps tests simple.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

template <typename A>
__device__ __forceinline__ A quiet_nan() {
  return static_cast<A>(__int_as_float(0x7fc00000));
}

// ---- 8-element groups ------------------------------------------------------

template <typename T>
struct alignas(16) Group {
  T v[kGroup];
};

// Loads elements [i, i + 8) of p; `vec` promises p is 16-byte aligned (i is a
// multiple of 8, so every chunk is). 8 elements are 1, 2 or 4 16-byte chunks.
template <typename T>
__device__ __forceinline__ Group<T> load_group(const T* __restrict__ p, int64_t i, bool vec) {
  Group<T> g;
  if (vec) {
    constexpr int kChunks = kGroup * sizeof(T) / 16;
    const uint4* q = reinterpret_cast<const uint4*>(p + i);
    uint4* d = reinterpret_cast<uint4*>(&g);
#pragma unroll
    for (int k = 0; k < kChunks; ++k) d[k] = __ldg(q + k);
  } else {
#pragma unroll
    for (int k = 0; k < kGroup; ++k) g.v[k] = p[i + k];
  }
  return g;
}

template <typename T>
__device__ __forceinline__ void store_group(T* __restrict__ p, int64_t i, bool vec, const Group<T>& g) {
  if (vec) {
    constexpr int kChunks = kGroup * sizeof(T) / 16;
    uint4* q = reinterpret_cast<uint4*>(p + i);
    const uint4* s = reinterpret_cast<const uint4*>(&g);
#pragma unroll
    for (int k = 0; k < kChunks; ++k) q[k] = s[k];
  } else {
#pragma unroll
    for (int k = 0; k < kGroup; ++k) p[i + k] = g.v[k];
  }
}

// Which channel each element of a group belongs to. z is [outer, C, inner] in
// memory (inner = 1 for channels_last).
enum class ChannelMode : int {
  kRun = 0,     // inner == 1 and C % 8 == 0: channels c0 .. c0+7
  kSingle = 1,  // inner % 8 == 0: one channel for the whole group
  kWalk = 2,    // anything else: walk (c, s) element by element
};

struct ChannelCursor {
  int64_t c, s;
  __device__ __forceinline__ ChannelCursor(int64_t i, int64_t C, int64_t inner) {
    const int64_t q = i / inner;
    s = i - q * inner;
    c = q % C;
  }
  __device__ __forceinline__ void next(int64_t C, int64_t inner) {
    if (++s == inner) {
      s = 0;
      if (++c == C) c = 0;
    }
  }
};

// ---- Welford ---------------------------------------------------------------

// Chan et al.'s merge of (n, mean, m2) states; an empty side leaves the other.
template <typename A>
__device__ __forceinline__ void chan_merge(A& n, A& mean, A& m2, A nb, A meanb, A m2b) {
  const A nab = n + nb;
  if (nb == A(0)) return;
  const A delta = meanb - mean;
  const A w = nb / nab;
  mean = mean + delta * w;
  m2 = m2 + m2b + delta * delta * n * w;
  n = nab;
}

}  // namespace bn

// ---- reduction plan (host) ---------------------------------------------------
//
// Per-channel reductions run in two deterministic stages: blocks write one
// partial per (partial row, channel) into a torch-allocated buffer, and a
// second kernel combines each channel's partial rows in a fixed order.
// Channels_last data (inner == 1) is read as [rows, C] with threads laid out
// over rows x channel vectors; NCHW data as one block column per channel.
struct BnReducePlan {
  int vec;            // elements per thread access (128-bit when > 1)
  int tx, ty;         // rows layout: threads over channel vectors x rows
  int64_t units;      // per-channel units: rows (rows layout) or vectors (planes)
  int64_t per_block;  // units per partial row
  int partials;       // partial rows actually used (<= bn_max_partials)
  int grid_x;         // rows layout: channel tiles; planes layout: C
  bool rows_layout;
};

inline int64_t bn_div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline BnReducePlan bn_reduce_plan(const BnShape& s, int vec, int num_sms) {
  BnReducePlan p{};
  p.vec = vec;
  const int64_t max_partials = bn_max_partials(num_sms);
  const int64_t want_blocks = static_cast<int64_t>(num_sms) * 4;
  int64_t g;
  if (s.inner == 1) {
    p.rows_layout = true;
    const int64_t groups = s.channels / vec;
    int tx = 1;
    while (tx < groups && tx < 64) tx *= 2;
    p.tx = tx;
    p.ty = bn::kThreads / tx;
    p.grid_x = static_cast<int>(bn_div_up(groups, tx));
    p.units = s.outer;
    // At least 8 rows per thread, enough blocks to fill the GPU.
    g = bn_div_up(p.units, static_cast<int64_t>(p.ty) * 8);
    const int64_t by_fill = bn_div_up(want_blocks, p.grid_x);
    g = g < by_fill ? g : by_fill;
  } else {
    p.rows_layout = false;
    p.tx = bn::kThreads;
    p.ty = 1;
    p.grid_x = static_cast<int>(s.channels);
    p.units = s.outer * (s.inner / vec);
    g = bn_div_up(p.units, static_cast<int64_t>(bn::kThreads) * 4);
    const int64_t by_fill = bn_div_up(want_blocks, s.channels);
    g = g < by_fill ? g : by_fill;
  }
  g = g < max_partials ? g : max_partials;
  g = g > 0 ? g : 1;
  p.per_block = bn_div_up(p.units, g);
  if (p.per_block == 0) p.per_block = 1;
  p.partials = static_cast<int>(bn_div_up(p.units, p.per_block));
  if (p.partials == 0) p.partials = 1;
  return p;
}

}  // namespace fused_resnet
