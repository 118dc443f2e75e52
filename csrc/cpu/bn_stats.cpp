// CPU fused_resnet::bn_stats: per-channel mean and biased variance of z.
//
// Stable for a large mean with a small spread: every partial (a plane
// segment, or a block of rows) is reduced in two passes over data that is
// still in cache (mean first, then squared deviations from it), and the
// partials are combined with Chan's pairwise update in a fixed order.
// As eager PyTorch's CPU kernel, which accumulates fp32 statistics in double,
// the second pass (the one the result comes from) runs in double: each
// value's deviation from (shift + first-pass mean) is exact there, where an
// fp32 subtraction would round it by eps/2 x the spread, and the mean would
// then differ from eager's by several of its ulps whenever the spread is
// large next to the mean. The first pass only estimates the mean; its error
// is taken back by the second (the corrected two-pass update). A partial's
// mean is kept as that estimate plus the second pass's correction, summed
// in double.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "bn_common.h"

namespace fused_resnet {
namespace bn {
namespace {

template <typename V>
inline typename V::value_type hsum(const V& v) {
  alignas(64) typename V::value_type buf[V::size()];
  v.store(buf);
  typename V::value_type s = 0;
  for (int64_t j = 0; j < V::size(); ++j) s += buf[j];
  return s;
}

using VD = Vectorized<double>;
constexpr int64_t kVD = VD::size();

// kVD consecutive values as doubles (the compiler turns the loop into one
// widening load).
template <typename T>
inline VD load_double(const T* p) {
  alignas(64) double buf[kVD];
  for (int64_t i = 0; i < kVD; ++i) buf[i] = static_cast<double>(p[i]);
  return VD::loadu(buf);
}

// Mean and sum of squared deviations of p[0..n) (n >= 1), two passes.
// Both relative to the channel's shift k: the returned mean is mean - k.
template <typename scalar_t>
void run_moments(const scalar_t* p, int64_t n, at::opmath_type<scalar_t> k, double& mean_out,
                 at::opmath_type<scalar_t>& m2) {
  using IO = Io<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  const int64_t nvec = n - n % IO::kBlock;
  const V kv(k);
  V s0(0), s1(0);
  for (int64_t j = 0; j < nvec; j += IO::kBlock) {
    V a, b;
    IO::load(p + j, a, b);
    s0 += a - kv;
    s1 += b - kv;
  }
  acc_t sum = hsum(s0 + s1);
  for (int64_t j = nvec; j < n; ++j) sum += static_cast<acc_t>(p[j]) - k;
  const acc_t mean = sum / static_cast<acc_t>(n);
  // Second pass in double, from the centre k + mean (exact in double).
  const double centre = static_cast<double>(k) + static_cast<double>(mean);
  const VD cv(centre);
  const int64_t nd = n - n % (2 * kVD);
  VD q0(0), q1(0), d0(0), d1(0);
  for (int64_t j = 0; j < nd; j += 2 * kVD) {
    const VD a = load_double(p + j) - cv, b = load_double(p + j + kVD) - cv;
    d0 += a;
    d1 += b;
    q0 = at::vec::fmadd(a, a, q0);
    q1 = at::vec::fmadd(b, b, q1);
  }
  double sq_d = hsum(q0 + q1), sd_d = hsum(d0 + d1);
  for (int64_t j = nd; j < n; ++j) {
    const double d = static_cast<double>(p[j]) - centre;
    sd_d += d;
    sq_d += d * d;
  }
  // Corrected two-pass: the rounding error of the first mean (sd != 0)
  // would otherwise add n * err^2 to m2.
  const double corr = sd_d / static_cast<double>(n);
  mean_out = static_cast<double>(mean);
  if (std::isfinite(corr)) mean_out += corr;  // an Inf mean stays Inf, as eager's
  m2 = static_cast<acc_t>(sq_d - sd_d * corr);
  if (m2 < acc_t(0)) m2 = acc_t(0);  // not std::max: NaN must survive
}

template <typename acc_t>
inline acc_t shift_of(acc_t v) {
  return std::isfinite(v) ? v : acc_t(0);
}

// Per-channel shift: fp32 cannot hold a partial mean of ~1e4 finely enough
// to merge variances of ~1e-4, so partials are taken relative to a value of
// the channel itself (x - k is exact for nearby values): each channel's first
// value, channels `stride` elements apart (S for planes, 1 for rows).
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> channel_shifts(const scalar_t* zp, int64_t C, int64_t stride) {
  std::vector<at::opmath_type<scalar_t>> k(C);
  for (int64_t c = 0; c < C; ++c) k[c] = shift_of(static_cast<at::opmath_type<scalar_t>>(zp[c * stride]));
  return k;
}

// Chan et al.: fold partial (nb, mb, qb) into the running (n, mean, m2).
template <typename acc_t>
inline void chan_merge(int64_t& n, acc_t& mean, acc_t& m2, int64_t nb, acc_t mb, acc_t qb) {
  if (nb == 0) return;
  const int64_t nt = n + nb;
  if (!std::isfinite(mean) || !std::isfinite(mb)) {
    // Inf/NaN data: the mean follows a plain sum (Inf, or NaN for Inf - Inf)
    // and the variance is NaN, as torch.var_mean gives.
    mean = n == 0 ? mb : mean + mb;
    m2 = std::numeric_limits<acc_t>::quiet_NaN();
    n = nt;
    return;
  }
  const acc_t delta = mb - mean;
  const acc_t wb = static_cast<acc_t>(static_cast<double>(nb) / static_cast<double>(nt));
  const acc_t wab = static_cast<acc_t>(static_cast<double>(n) * static_cast<double>(nb) / static_cast<double>(nt));
  mean = mean + delta * wb;
  m2 = m2 + qb + delta * delta * wab;
  n = nt;
}

template <typename scalar_t>
void stats_planes(const scalar_t* zp, const Layout& l, at::opmath_type<scalar_t>* mean_out,
                  at::opmath_type<scalar_t>* var_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nseg = (l.S + kPlaneSeg - 1) / kPlaneSeg;
  const int64_t tasks = l.N * l.C * nseg;
  std::vector<double> pm(tasks);
  std::vector<acc_t> pq(tasks);
  const std::vector<acc_t> k = channel_shifts(zp, l.C, l.S);
  const int64_t seg_len = std::min(l.S, kPlaneSeg);
  const int64_t grain = std::max<int64_t>(1, 16384 / seg_len);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t plane = t / nseg, seg = t % nseg;
      const int64_t off = seg * kPlaneSeg;
      const int64_t len = std::min(kPlaneSeg, l.S - off);
      run_moments<scalar_t>(zp + plane * l.S + off, len, k[plane % l.C], pm[t], pq[t]);
    }
  });
  at::parallel_for(0, l.C, 16, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      // Merged in double: fp32 running sums over millions of values per
      // channel drift by ~1e-5 relative when the partials are far from the
      // shift (an outlier first value).
      int64_t n = 0;
      double mean = 0, m2 = 0;
      for (int64_t i = 0; i < l.N; ++i) {
        for (int64_t s = 0; s < nseg; ++s) {
          const int64_t t = (i * l.C + c) * nseg + s;
          chan_merge<double>(n, mean, m2, std::min(kPlaneSeg, l.S - s * kPlaneSeg), pm[t], pq[t]);
        }
      }
      mean_out[c] = static_cast<acc_t>(mean + static_cast<double>(k[c]));
      var_out[c] = static_cast<acc_t>(m2 / static_cast<double>(n));
    }
  });
}

// Merges per-block partials (block mean relative to the shift kk, as pm + pc,
// and sum of squared deviations; blocks of `rb` rows, the last one shorter) in block
// order with Chan's update, in double: fp32 running sums over millions of
// values per channel drift by ~1e-5 relative when the partials are far from
// the shift (an outlier first value). Every block has the same count for all
// channels, so the weights are computed once per block and the inner loop
// runs across channels; it is branch-free (vectorised by the compiler) until
// a non-finite partial mean appears, after which chan_merge itself (with its
// Inf/NaN rule) runs per channel.
template <typename acc_t>
void merge_row_blocks(const acc_t* pm, const acc_t* pc, const acc_t* pq, int64_t C, int64_t R, int64_t rb,
                      const acc_t* kk, acc_t* mean_out, acc_t* var_out) {
  const int64_t nblk = (R + rb - 1) / rb;
  at::parallel_for(0, C, 256, [&](int64_t cb, int64_t ce) {
    const int64_t w = ce - cb;
    std::vector<double> mean_acc(w, 0.0), m2_acc(w, 0.0);
    bool all_finite = true;
    int64_t seen = 0;
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const int64_t nb = std::min(R, (blk + 1) * rb) - blk * rb;
      const int64_t nt = seen + nb;
      const double wb = static_cast<double>(nb) / static_cast<double>(nt);
      const double wab = static_cast<double>(seen) * static_cast<double>(nb) / static_cast<double>(nt);
      const acc_t* bm = pm + blk * C + cb;
      const acc_t* bc = pc + blk * C + cb;
      const acc_t* bq = pq + blk * C + cb;
      double* mean = mean_acc.data();
      double* m2 = m2_acc.data();
      if (all_finite) {
        bool finite = true;
        for (int64_t c = 0; c < w; ++c) finite &= std::isfinite(bm[c]);
        all_finite = finite;
      }
      if (all_finite) {
        for (int64_t c = 0; c < w; ++c) {
          const double mb = static_cast<double>(bm[c]) + static_cast<double>(bc[c]);
          const double delta = mb - mean[c];
          // chan_merge's expressions, in its order of operations.
          mean[c] = mean[c] + delta * wb;
          m2[c] = m2[c] + static_cast<double>(bq[c]) + delta * delta * wab;
        }
      } else {
        for (int64_t c = 0; c < w; ++c) {
          int64_t n = seen;  // every channel has seen the same count
          chan_merge<double>(n, mean[c], m2[c], nb, static_cast<double>(bm[c]) + static_cast<double>(bc[c]),
                             static_cast<double>(bq[c]));
        }
      }
      seen = nt;
    }
    for (int64_t c = 0; c < w; ++c) {
      mean_out[cb + c] = static_cast<acc_t>(mean_acc[c] + static_cast<double>(kk[cb + c]));
      var_out[cb + c] = static_cast<acc_t>(m2_acc[c] / static_cast<double>(R));
    }
  });
}

// Rows layout, two strategies (chosen by size only, so results stay
// deterministic):
//  * tiled (tensors up to kStreamedBytes): tiles of kTileRows rows x up to
//    kTileChunks vector chunks; the first pass keeps its sums in registers
//    and copies the shifted values into a 16 KiB scratch tile, which the
//    second pass reads back from L1. Reading the tile back from z itself
//    would thrash L1: with C = 1024 or 2048 fp32 channels the rows are 4 or
//    8 KiB apart and all map to the same cache sets.
//  * streamed (larger tensors, which come from memory rather than cache):
//    blocks of whole rows walked in address order, the hardware prefetcher's
//    best case, with per-channel sums in an L1 array.
constexpr int64_t kTileRows = 64;
constexpr int kTileChunks = 4;
constexpr int64_t kStreamedBytes = int64_t(16) << 20;

// Corrected two-pass moments of one channel over `nrows` rows `ld` apart
// (the channels past the last whole vector chunk of a tile), scalar.
template <typename scalar_t>
inline void channel_moments(const scalar_t* p, int64_t ld, int64_t nrows, at::opmath_type<scalar_t> k,
                            at::opmath_type<scalar_t>& mean_out, at::opmath_type<scalar_t>& corr_out,
                            at::opmath_type<scalar_t>& m2_out) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t s = 0;
  for (int64_t r = 0; r < nrows; ++r) s += static_cast<acc_t>(p[r * ld]) - k;
  const acc_t m = s / static_cast<acc_t>(nrows);
  const double centre = static_cast<double>(k) + static_cast<double>(m);
  double dsum = 0, q = 0;
  for (int64_t r = 0; r < nrows; ++r) {
    const double d = static_cast<double>(p[r * ld]) - centre;
    dsum += d;
    q += d * d;
  }
  const double corr = dsum / static_cast<double>(nrows);
  mean_out = m;
  corr_out = std::isfinite(corr) ? static_cast<acc_t>(corr) : acc_t(0);
  const acc_t m2 = static_cast<acc_t>(q - dsum * corr);
  m2_out = m2 < acc_t(0) ? acc_t(0) : m2;
}

// Pass 1 over a tile: NCH vector chunks x nrows rows. Sums (x - k) per lane in
// registers and keeps x in `scratch` (row-major, NCH * kBlock wide).
template <typename scalar_t, int NCH>
inline void tile_pass1(const scalar_t* p, int64_t ld, int64_t nrows, const at::opmath_type<scalar_t>* k,
                       at::opmath_type<scalar_t>* scratch, at::opmath_type<scalar_t>* sums) {
  using IO = Io<scalar_t>;
  using V = typename IO::V;
  constexpr int64_t W = NCH * IO::kBlock;
  V acc[2 * NCH];
  for (int j = 0; j < 2 * NCH; ++j) acc[j] = V(0);
  for (int64_t r = 0; r < nrows; ++r) {
    const scalar_t* row = p + r * ld;
    auto* out = scratch + r * W;
#pragma GCC unroll 4
    for (int j = 0; j < NCH; ++j) {
      V a, b;
      IO::load(row + j * IO::kBlock, a, b);
      a.store(out + j * IO::kBlock);
      b.store(out + j * IO::kBlock + IO::kV);
      acc[2 * j] += a - V::loadu(k + j * IO::kBlock);
      acc[2 * j + 1] += b - V::loadu(k + j * IO::kBlock + IO::kV);
    }
  }
  for (int j = 0; j < 2 * NCH; ++j) acc[j].store(sums + j * IO::kV);
}

// Pass 2 for one chunk (kBlock channels) of the scratch tile (rows `ld`
// apart), in double: deviations from k + the first-pass block mean, then the
// corrected two-pass update of run_moments (the correction is 0 where it is
// not finite, so an Inf mean stays Inf; a tiny negative m2 is clamped to 0,
// NaN survives). `mean` holds the chunk's sums of (x - k) on entry, the
// first-pass block mean (minus k) on exit; `corr_out` the correction to add.
template <typename acc_t, int64_t kBlock>
inline void scratch_pass2(const acc_t* s, int64_t ld, int64_t nrows, const acc_t* k, acc_t* mean, acc_t* corr_out,
                          acc_t* m2) {
  static_assert(kBlock % kVD == 0, "a chunk is whole double vectors");
  constexpr int64_t ND = kBlock / kVD;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(nrows);
  alignas(64) double centre[kBlock];
  for (int64_t c = 0; c < kBlock; ++c) {
    mean[c] = mean[c] * inv_n;
    centre[c] = static_cast<double>(k[c]) + static_cast<double>(mean[c]);
  }
  VD cv[ND], d[ND], q[ND];
  for (int64_t i = 0; i < ND; ++i) {
    cv[i] = VD::loadu(centre + i * kVD);
    d[i] = VD(0);
    q[i] = VD(0);
  }
  for (int64_t r = 0; r < nrows; ++r) {
#pragma GCC unroll 8
    for (int64_t i = 0; i < ND; ++i) {
      const VD x = load_double(s + r * ld + i * kVD) - cv[i];
      d[i] += x;
      q[i] = at::vec::fmadd(x, x, q[i]);
    }
  }
  alignas(64) double dsum[kBlock], sq[kBlock];
  for (int64_t i = 0; i < ND; ++i) {
    d[i].store(dsum + i * kVD);
    q[i].store(sq + i * kVD);
  }
  for (int64_t c = 0; c < kBlock; ++c) {
    const double corr = dsum[c] / static_cast<double>(nrows);
    corr_out[c] = std::isfinite(corr) ? static_cast<acc_t>(corr) : acc_t(0);
    const double v = sq[c] - dsum[c] * corr;
    m2[c] = v < 0 ? acc_t(0) : static_cast<acc_t>(v);
  }
}

// Block mean (minus k, as first-pass mean + correction) and sum of squared
// deviations of NCH chunks.
template <typename scalar_t, int NCH>
inline void tile_moments(const scalar_t* p, int64_t ld, int64_t nrows, const at::opmath_type<scalar_t>* k,
                         at::opmath_type<scalar_t>* scratch, at::opmath_type<scalar_t>* mean,
                         at::opmath_type<scalar_t>* corr, at::opmath_type<scalar_t>* m2) {
  using IO = Io<scalar_t>;
  tile_pass1<scalar_t, NCH>(p, ld, nrows, k, scratch, mean);
  for (int j = 0; j < NCH; ++j) {
    scratch_pass2<at::opmath_type<scalar_t>, IO::kBlock>(scratch + j * IO::kBlock, NCH * IO::kBlock, nrows,
                                                         k + j * IO::kBlock, mean + j * IO::kBlock,
                                                         corr + j * IO::kBlock, m2 + j * IO::kBlock);
  }
}

template <typename scalar_t>
void stats_rows_tiled(const scalar_t* zp, const Layout& l, at::opmath_type<scalar_t>* mean_out,
                      at::opmath_type<scalar_t>* var_out) {
  using IO = Io<scalar_t>;
  using acc_t = typename IO::acc_t;
  const int64_t C = l.C, R = l.N * l.S;
  const int64_t chunks = C / IO::kBlock;
  const int64_t groups = std::max<int64_t>(1, (chunks + kTileChunks - 1) / kTileChunks);
  const int64_t nblk = (R + kTileRows - 1) / kTileRows;
  std::vector<acc_t> pm(nblk * C), pc(nblk * C), pq(nblk * C);
  const std::vector<acc_t> kk = channel_shifts(zp, C, 1);
  at::parallel_for(0, nblk * groups, 1, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t scratch[kTileRows * kTileChunks * IO::kBlock];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t blk = t / groups, g = t % groups;
      const int64_t r0 = blk * kTileRows, nrows = std::min(R, r0 + kTileRows) - r0;
      const int64_t ch0 = std::min(chunks, g * kTileChunks), ch1 = std::min(chunks, (g + 1) * kTileChunks);
      const int64_t c0 = ch0 * IO::kBlock;
      const scalar_t* p = zp + r0 * C + c0;
      acc_t* m = pm.data() + blk * C + c0;
      acc_t* mc = pc.data() + blk * C + c0;
      acc_t* q = pq.data() + blk * C + c0;
      const acc_t* k = kk.data() + c0;
      // The chunk count as a compile-time constant keeps the sums in registers.
      static_assert(kTileChunks == 4, "one case per chunk count");
      switch (ch1 - ch0) {
        case 4: tile_moments<scalar_t, 4>(p, C, nrows, k, scratch, m, mc, q); break;
        case 3: tile_moments<scalar_t, 3>(p, C, nrows, k, scratch, m, mc, q); break;
        case 2: tile_moments<scalar_t, 2>(p, C, nrows, k, scratch, m, mc, q); break;
        case 1: tile_moments<scalar_t, 1>(p, C, nrows, k, scratch, m, mc, q); break;
        default: break;  // no whole chunk (C < one vector chunk)
      }
      if (g == groups - 1) {  // the last group also owns the channels past the last whole chunk
        for (int64_t c = chunks * IO::kBlock; c < C; ++c) {
          channel_moments<scalar_t>(zp + r0 * C + c, C, nrows, kk[c], pm[blk * C + c], pc[blk * C + c],
                                    pq[blk * C + c]);
        }
      }
    }
  });
  merge_row_blocks<acc_t>(pm.data(), pc.data(), pq.data(), C, R, kTileRows, kk.data(), mean_out, var_out);
}

template <typename scalar_t>
void stats_rows_streamed(const scalar_t* zp, const Layout& l, at::opmath_type<scalar_t>* mean_out,
                         at::opmath_type<scalar_t>* var_out) {
  using IO = Io<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  const int64_t C = l.C, R = l.N * l.S;
  const RowTiles tiles(R, C);
  const int64_t rb = tiles.rows;
  const int64_t nblk = tiles.nblocks;
  std::vector<acc_t> pm(nblk * C), pc(nblk * C), pq(nblk * C);
  const std::vector<acc_t> kk = channel_shifts(zp, C, 1);
  at::parallel_for(0, tiles.tasks(), 1, [&](int64_t begin, int64_t end) {
    // The second pass's centres and sums, in double.
    std::vector<double> centre_buf(tiles.width), dsum_buf(tiles.width), sq_buf(tiles.width);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t k = t / tiles.ntiles;
      const int64_t c0 = (t % tiles.ntiles) * tiles.width;
      const int64_t w = std::min(C - c0, tiles.width);
      const int64_t wvec = w - w % IO::kBlock;
      const int64_t r0 = k * rb, r1 = std::min(R, r0 + rb);
      acc_t* m = pm.data() + k * C + c0;
      acc_t* mc = pc.data() + k * C + c0;
      acc_t* q = pq.data() + k * C + c0;
      const acc_t* kp = kk.data() + c0;
      double* centre = centre_buf.data();
      double* dsum = dsum_buf.data();
      double* sq = sq_buf.data();
      std::fill(m, m + w, acc_t(0));
      std::fill(dsum, dsum + w, 0.0);
      std::fill(sq, sq + w, 0.0);
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = zp + r * C + c0;
        for (int64_t c = 0; c < wvec; c += IO::kBlock) {
          V a, b;
          IO::load(row + c, a, b);
          (V::loadu(m + c) + (a - V::loadu(kp + c))).store(m + c);
          (V::loadu(m + c + IO::kV) + (b - V::loadu(kp + c + IO::kV))).store(m + c + IO::kV);
        }
        for (int64_t c = wvec; c < w; ++c) m[c] += static_cast<acc_t>(row[c]) - kp[c];
      }
      const acc_t inv_n = acc_t(1) / static_cast<acc_t>(r1 - r0);
      for (int64_t c = 0; c < w; ++c) {
        m[c] *= inv_n;
        centre[c] = static_cast<double>(kp[c]) + static_cast<double>(m[c]);
      }
      const int64_t wd = w - w % kVD;
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = zp + r * C + c0;
        for (int64_t c = 0; c < wd; c += kVD) {
          const VD x = load_double(row + c) - VD::loadu(centre + c);
          (VD::loadu(dsum + c) + x).store(dsum + c);
          at::vec::fmadd(x, x, VD::loadu(sq + c)).store(sq + c);
        }
        for (int64_t c = wd; c < w; ++c) {
          const double x = static_cast<double>(row[c]) - centre[c];
          dsum[c] += x;
          sq[c] += x * x;
        }
      }
      for (int64_t c = 0; c < w; ++c) {
        const double corr = dsum[c] / static_cast<double>(r1 - r0);
        mc[c] = std::isfinite(corr) ? static_cast<acc_t>(corr) : acc_t(0);
        const double v = sq[c] - dsum[c] * corr;
        q[c] = v < 0 ? acc_t(0) : static_cast<acc_t>(v);
      }
    }
  });
  merge_row_blocks<acc_t>(pm.data(), pc.data(), pq.data(), C, R, rb, kk.data(), mean_out, var_out);
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& z_in) {
  check_z(z_in, "bn_stats");
  const auto fmt = compute_format(z_in);
  const at::Tensor z = z_in.contiguous(fmt);
  const Layout l = layout_of(z, fmt);
  const auto opts = z.options().dtype(stat_type(z.scalar_type()));
  at::Tensor mean = at::empty({l.C}, opts);
  at::Tensor var = at::empty({l.C}, opts);
  if (l.C == 0) return {mean, var};
  if (l.count() == 0) {  // torch.var_mean of nothing: NaN
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    if (l.rows && l.numel() * static_cast<int64_t>(sizeof(scalar_t)) > kStreamedBytes) {
      stats_rows_streamed<scalar_t>(zp, l, mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
    } else if (l.rows) {
      stats_rows_tiled<scalar_t>(zp, l, mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
    } else {
      stats_planes<scalar_t>(zp, l, mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
    }
  });
  return {mean, var};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
}

}  // namespace bn
}  // namespace fused_resnet
