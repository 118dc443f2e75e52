// CPU fused_resnet::bn_stats: per-channel mean and biased variance of z.
//
// Stable for a large mean with a small spread: every partial (a plane
// segment, or a block of rows) is reduced in two passes over data that is
// still in cache (mean first, then squared deviations from it), and the
// partials are combined with Chan's pairwise update in a fixed order.
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

// Mean and sum of squared deviations of p[0..n) (n >= 1), two passes.
// Both relative to the channel's shift k: the returned mean is mean - k.
template <typename scalar_t>
void run_moments(const scalar_t* p, int64_t n, at::opmath_type<scalar_t> k, at::opmath_type<scalar_t>& mean,
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
  mean = sum / static_cast<acc_t>(n);
  const V mv(mean);
  V q0(0), q1(0), d0(0), d1(0);
  for (int64_t j = 0; j < nvec; j += IO::kBlock) {
    V a, b;
    IO::load(p + j, a, b);
    a = (a - kv) - mv;
    b = (b - kv) - mv;
    d0 += a;
    d1 += b;
    q0 = at::vec::fmadd(a, a, q0);
    q1 = at::vec::fmadd(b, b, q1);
  }
  acc_t sq = hsum(q0 + q1), sd = hsum(d0 + d1);
  for (int64_t j = nvec; j < n; ++j) {
    const acc_t d = (static_cast<acc_t>(p[j]) - k) - mean;
    sd += d;
    sq += d * d;
  }
  // Corrected two-pass: the rounding error of the first mean (sd != 0)
  // would otherwise add n * err^2 to m2.
  const acc_t corr = sd / static_cast<acc_t>(n);
  if (std::isfinite(corr)) mean += corr;  // an Inf mean stays Inf, as eager's
  m2 = sq - sd * corr;
  if (m2 < acc_t(0)) m2 = acc_t(0);  // not std::max: NaN must survive
}

template <typename acc_t>
inline acc_t shift_of(acc_t v) {
  return std::isfinite(v) ? v : acc_t(0);
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
  std::vector<acc_t> pm(tasks), pq(tasks);
  // Per-channel shift: fp32 cannot hold a partial mean of ~1e4 finely enough
  // to merge variances of ~1e-4, so partials are taken relative to a value
  // of the channel itself (x - k is exact for nearby values).
  std::vector<acc_t> k(l.C);
  for (int64_t c = 0; c < l.C; ++c) k[c] = shift_of(static_cast<acc_t>(zp[c * l.S]));
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

template <typename scalar_t>
void stats_rows(const scalar_t* zp, const Layout& l, at::opmath_type<scalar_t>* mean_out,
                at::opmath_type<scalar_t>* var_out) {
  using IO = Io<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  const int64_t C = l.C, R = l.N * l.S;
  const RowTiles tiles(R, C);
  const int64_t rb = tiles.rows;
  const int64_t nblk = tiles.nblocks;
  std::vector<acc_t> pm(nblk * C), pq(nblk * C);
  std::vector<acc_t> kk(C);  // per-channel shift, as in stats_planes
  for (int64_t c = 0; c < C; ++c) kk[c] = shift_of(static_cast<acc_t>(zp[c]));
  at::parallel_for(0, tiles.tasks(), 1, [&](int64_t begin, int64_t end) {
    // Sum of deviations, for the corrected two-pass update below.
    std::vector<acc_t> dsum_buf(tiles.width);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t k = t / tiles.ntiles;
      const int64_t c0 = (t % tiles.ntiles) * tiles.width;
      const int64_t w = std::min(C - c0, tiles.width);
      const int64_t wvec = w - w % IO::kBlock;
      const int64_t r0 = k * rb, r1 = std::min(R, r0 + rb);
      acc_t* m = pm.data() + k * C + c0;
      acc_t* q = pq.data() + k * C + c0;
      const acc_t* kp = kk.data() + c0;
      acc_t* dsum = dsum_buf.data();
      std::fill(m, m + w, acc_t(0));
      std::fill(q, q + w, acc_t(0));
      std::fill(dsum, dsum + w, acc_t(0));
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
      for (int64_t c = 0; c < w; ++c) m[c] *= inv_n;
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = zp + r * C + c0;
        for (int64_t c = 0; c < wvec; c += IO::kBlock) {
          V a, b;
          IO::load(row + c, a, b);
          a = (a - V::loadu(kp + c)) - V::loadu(m + c);
          b = (b - V::loadu(kp + c + IO::kV)) - V::loadu(m + c + IO::kV);
          (V::loadu(dsum + c) + a).store(dsum + c);
          (V::loadu(dsum + c + IO::kV) + b).store(dsum + c + IO::kV);
          at::vec::fmadd(a, a, V::loadu(q + c)).store(q + c);
          at::vec::fmadd(b, b, V::loadu(q + c + IO::kV)).store(q + c + IO::kV);
        }
        for (int64_t c = wvec; c < w; ++c) {
          const acc_t d = (static_cast<acc_t>(row[c]) - kp[c]) - m[c];
          dsum[c] += d;
          q[c] += d * d;
        }
      }
      for (int64_t c = 0; c < w; ++c) {
        const acc_t corr = dsum[c] * inv_n;
        if (std::isfinite(corr)) m[c] += corr;
        q[c] = q[c] - dsum[c] * corr;
        if (q[c] < acc_t(0)) q[c] = acc_t(0);
      }
    }
  });
  // Merge the blocks in order. Every block has the same count for all
  // channels, so the Chan weights are computed once per block and the inner
  // loop runs across channels.
  at::parallel_for(0, C, 256, [&](int64_t cb, int64_t ce) {
    // Merged in double, as in stats_planes.
    std::vector<double> mean_acc(ce - cb, 0.0), m2_acc(ce - cb, 0.0);
    int64_t seen = 0;
    for (int64_t k = 0; k < nblk; ++k) {
      const int64_t nb = std::min(rb, R - k * rb);
      const int64_t nt = seen + nb;
      const double wb = static_cast<double>(nb) / static_cast<double>(nt);
      const double wab = static_cast<double>(seen) * static_cast<double>(nb) / static_cast<double>(nt);
      const acc_t* bm = pm.data() + k * C;
      const acc_t* bq = pq.data() + k * C;
      for (int64_t c = cb; c < ce; ++c) {
        const double mb = static_cast<double>(bm[c]);
        double& mean = mean_acc[c - cb];
        double& m2 = m2_acc[c - cb];
        if (std::isfinite(mean) && std::isfinite(mb)) {
          const double delta = mb - mean;
          mean = mean + delta * wb;
          m2 = m2 + static_cast<double>(bq[c]) + delta * delta * wab;
        } else {  // same Inf/NaN rule as chan_merge
          mean = seen == 0 ? mb : mean + mb;
          m2 = std::numeric_limits<double>::quiet_NaN();
        }
      }
      seen = nt;
    }
    for (int64_t c = cb; c < ce; ++c) {
      mean_out[c] = static_cast<acc_t>(mean_acc[c - cb] + static_cast<double>(kk[c]));
      var_out[c] = static_cast<acc_t>(m2_acc[c - cb] / static_cast<double>(R));
    }
  });
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
    if (l.rows) {
      stats_rows<scalar_t>(zp, l, mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
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
