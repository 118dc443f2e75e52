// Shared pieces of the CPU BatchNorm kernels (bn_stats, bn_apply,
// bn_backward): the two memory layouts we walk, vector load/store of every
// supported dtype as two op-math vectors, ReLU-mask bit handling, and the
// argument checks common to the ops.
//
// Layouts. z is viewed as either
//  * "planes": N x C x S, contiguous; each (n, c) plane is a run of S values
//    of one channel (NCHW and any contiguous >2-D tensor), or
//  * "rows": R x C, channel fastest (channels_last, or any contiguous tensor
//    with S == 1, whose memory is the same).
// Reductions produce partial results on a partition that depends only on
// the shape (never on the thread count) and merge them in a fixed order, so
// every result is bit-reproducible run to run.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../fused_resnet.h"

namespace fused_resnet {
namespace bn {

using at::vec::Vectorized;

struct Layout {
  int64_t N = 0, C = 0, S = 0;  // batch, channels, values per (n, c) plane
  bool rows = false;            // channel is the fastest-moving index
  int64_t numel() const { return N * C * S; }
  int64_t count() const { return N * S; }  // values per channel
};

// z must already be contiguous in `fmt`.
inline Layout layout_of(const at::Tensor& z, at::MemoryFormat fmt) {
  Layout l;
  l.N = z.size(0);
  l.C = z.size(1);
  l.S = 1;
  for (int64_t d = 2; d < z.dim(); ++d) l.S *= z.size(d);
  l.rows = fmt == at::MemoryFormat::ChannelsLast || l.S == 1;
  return l;
}

// Planes longer than this are split, so one huge plane still parallelises
// and its two-pass statistics stay in cache.
constexpr int64_t kPlaneSeg = 8192;
// Target elements per row block in the rows layout (about 64 KiB of fp32,
// still in L2 for the second pass; fewer blocks make the merge cheap).
constexpr int64_t kRowBlockElems = 16384;
// Elementwise passes walk memory in chunks of this many elements; a multiple
// of 64 so that every chunk owns whole bytes of the bit mask.
constexpr int64_t kChunk = 4096;

inline int64_t rows_per_block(int64_t C) {
  const int64_t r = kRowBlockElems / std::max<int64_t>(C, 1);
  return std::max<int64_t>(r, 1);
}

// Reductions in the rows layout work on tiles of at most this many channels
// (a multiple of every vector block), so that the per-channel accumulators
// of a tile (a few arrays of kChannelTile values) stay in L1 while rows
// stream past; wide layers (C = 1024, 2048) otherwise thrash L1 on every row.
constexpr int64_t kChannelTile = 512;

// The rows-layout partition every reduction uses: blocks of `rows` rows by
// tiles of `width` channels. Depends on the shape only (determinism).
struct RowTiles {
  int64_t width, ntiles, rows, nblocks;
  RowTiles(int64_t R, int64_t C) {
    width = std::min<int64_t>(std::max<int64_t>(C, 1), kChannelTile);
    ntiles = (C + width - 1) / width;
    rows = rows_per_block(width);
    nblocks = (R + rows - 1) / rows;
  }
  int64_t tasks() const { return ntiles * nblocks; }
};

// Loads/stores of kBlock consecutive scalar_t values as two op-math vectors
// (fp32 for fp32/fp16/bf16, fp64 for fp64).
template <typename scalar_t>
struct Io {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  static constexpr int64_t kV = V::size();
  static constexpr int64_t kBlock = 2 * kV;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;

  static inline void load(const scalar_t* p, V& a, V& b) {
    if constexpr (kReduced) {
      static_assert(Vectorized<scalar_t>::size() == kBlock, "reduced vector must hold two fp32 vectors");
      std::tie(a, b) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
    } else {
      a = V::loadu(p);
      b = V::loadu(p + kV);
    }
  }
  static inline void store(scalar_t* p, const V& a, const V& b) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(a, b).store(p);
    } else {
      a.store(p);
      b.store(p + kV);
    }
  }
  // Round to scalar_t's precision and back (identity for fp32/fp64), for the
  // rounding points eager has between its ops.
  static inline void round(V& a, V& b) {
    if constexpr (kReduced) {
      std::tie(a, b) = at::vec::convert_to_float<scalar_t>(at::vec::convert_from_float<scalar_t>(a, b));
    }
  }
  static inline acc_t round1(acc_t v) { return static_cast<acc_t>(static_cast<scalar_t>(v)); }
};

// y = v < 0 ? 0 : v, keeping NaN as eager's relu does.
template <typename V>
inline V relu_keep_nan(const V& v) {
  const V zero(0);
  return V::blendv(v, zero, v < zero);
}

// Bits (one per lane, lane j -> bit j) of the ReLU mask of v: v > 0, which
// gives 0 for NaN (bn_apply's mask); with kNanKeeps, !(v <= 0), which gives 1
// for NaN (eager's ReLU backward from its output, threshold_backward).
template <bool kNanKeeps, typename V>
inline uint64_t relu_bits(const V& v) {
  const V zero(0);
  // zero_mask marks lanes equal to 0; the comparison's lanes are all-ones or 0.
  if constexpr (kNanKeeps) return static_cast<uint64_t>(static_cast<uint32_t>((v <= zero).zero_mask()));
  const uint64_t lanes = (V::size() >= 64) ? ~uint64_t(0) : ((uint64_t(1) << V::size()) - 1);
  return ~static_cast<uint64_t>(static_cast<uint32_t>((v > zero).zero_mask())) & lanes;
}

// Reads `nbits` (<= 32) mask bits starting at element index i.
inline uint64_t read_bits(const uint8_t* mask, int64_t nbytes, int64_t i, int nbits) {
  const int64_t b = i >> 3;
  const int sh = static_cast<int>(i & 7);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  if (b + 8 <= nbytes) {  // one unaligned 8-byte load covers sh + nbits <= 39 bits
    uint64_t w;
    std::memcpy(&w, mask + b, 8);
    return (w >> sh) & ((uint64_t(1) << nbits) - 1);
  }
#endif
  const int need = (sh + nbits + 7) >> 3;
  uint64_t w = 0;
  for (int k = 0; k < need && b + k < nbytes; ++k) w |= static_cast<uint64_t>(mask[b + k]) << (8 * k);
  return (w >> sh) & ((uint64_t(1) << nbits) - 1);
}

// Expands lane bits into a lane mask vector (all-ones where the bit is set).
template <typename acc_t>
struct LaneMask {
  using I = std::conditional_t<sizeof(acc_t) == 8, int64_t, int32_t>;
  using VI = Vectorized<I>;
  using V = Vectorized<acc_t>;
  static_assert(VI::size() == V::size(), "lane counts must match");
  VI weights;
  LaneMask() {
    alignas(64) I w[VI::size()];
    for (int64_t j = 0; j < VI::size(); ++j) w[j] = static_cast<I>(int64_t(1) << j);
    weights = VI::loadu(w);
  }
  inline V expand(uint64_t bits) const {
    const VI b(static_cast<I>(bits));
    return at::vec::cast<acc_t>((b & weights) == weights);
  }
};

// Packs the ReLU mask (relu_bits' rule) of n values of y, starting at a
// multiple of 8, into mask bytes.
template <typename scalar_t, bool kNanKeeps = false>
inline void pack_relu_mask(const scalar_t* y, uint8_t* mask, int64_t n) {
  using IO = Io<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  int64_t j = 0;
  for (; j + IO::kBlock <= n; j += IO::kBlock) {
    V a, b;
    IO::load(y + j, a, b);
    const uint64_t bits = relu_bits<kNanKeeps>(a) | (relu_bits<kNanKeeps>(b) << IO::kV);
    for (int64_t k = 0; k < IO::kBlock / 8; ++k) mask[(j >> 3) + k] = static_cast<uint8_t>(bits >> (8 * k));
  }
  for (; j < n; j += 8) {
    uint8_t byte = 0;
    for (int64_t k = 0; k < 8 && j + k < n; ++k) {
      const acc_t v = static_cast<acc_t>(y[j + k]);
      if (kNanKeeps ? !(v <= acc_t(0)) : v > acc_t(0)) byte |= static_cast<uint8_t>(1u << k);
    }
    mask[j >> 3] = byte;
  }
}

// pack_relu_mask over a whole tensor of n values, in parallel chunks of
// kChunk (each owns whole mask bytes).
template <typename scalar_t, bool kNanKeeps = false>
inline void pack_relu_mask_all(const scalar_t* y, uint8_t* mask, int64_t n) {
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t k = cb; k < ce; ++k) {
      const int64_t b = k * kChunk, e = std::min(n, b + kChunk);
      pack_relu_mask<scalar_t, kNanKeeps>(y + b, mask + (b >> 3), e - b);
    }
  });
}

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fused_resnet.", op, ": `", name, "` is on ", t.device(),
              "; the CPU kernel expects every tensor on the CPU");
}

inline void check_z(const at::Tensor& z, const char* op) {
  check_cpu(z, op, "z");
  check_floating(z, "z");
  TORCH_CHECK(z.dim() >= 2, "fused_resnet.", op, ": `z` must have at least 2 dims (N, C, ...), got shape ",
              z.sizes());
}

// A per-channel vector: 1-D of length C, floating, on the CPU.
inline void check_channel_vec(const at::Tensor& t, const char* op, const char* name, int64_t C) {
  check_cpu(t, op, name);
  check_floating(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, "fused_resnet.", op, ": `", name,
              "` must be a 1-D tensor of C=", C, " values (one per channel of z), got shape ", t.sizes());
}

inline at::ScalarType stat_type(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace bn
}  // namespace fused_resnet
