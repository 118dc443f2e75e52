// CPU fused_resnet::bn_backward: the backward of bn_apply (+ BatchNorm's
// batch statistics when batch_stats), in two passes over memory:
//  1. a reduction: per channel sum(g) and sum(g * (z - mean)), g = dy masked
//     by the ReLU bits (the mask is read, y and xhat never exist);
//  2. elementwise: dz = A*g + B*(z - mean) + D with per-channel A, B, D, and
//     dresidual = g.
// Deviations from the mean (not z * invstd - mean * invstd) keep a large mean
// with a small spread exact, as eager's kernel does. Partials follow a fixed
// shape-only partition and are summed in order: deterministic.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "bn_common.h"
#include "output_cache.h"

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

template <typename grad_t, typename acc_t>
inline acc_t masked1(const grad_t* dy, const uint8_t* mask, int64_t i_abs, int64_t j) {
  if (mask != nullptr && !((mask[(i_abs + j) >> 3] >> ((i_abs + j) & 7)) & 1)) return acc_t(0);
  return static_cast<acc_t>(dy[j]);
}

// g for the kBlock elements at absolute index i_abs (dy already offset).
template <typename grad_t, bool kMask>
inline void load_g(const grad_t* dy, const uint8_t* mask, int64_t nbytes, int64_t i_abs,
                   const LaneMask<at::opmath_type<grad_t>>& lm, Vectorized<at::opmath_type<grad_t>>& ga,
                   Vectorized<at::opmath_type<grad_t>>& gb) {
  using IO = Io<grad_t>;
  using V = typename IO::V;
  IO::load(dy, ga, gb);
  if constexpr (kMask) {
    const uint64_t bits = read_bits(mask, nbytes, i_abs, static_cast<int>(IO::kBlock));
    const V zero(0);
    ga = V::blendv(zero, ga, lm.expand(bits & ((uint64_t(1) << IO::kV) - 1)));
    gb = V::blendv(zero, gb, lm.expand(bits >> IO::kV));
  }
}

// Pass 1 over a run of n elements starting at absolute index i_abs.
// kBcast: one channel (planes), results added to sg[0], sx[0]; otherwise the
// run covers consecutive channels and sg[j], sx[j] accumulate per element.
template <typename scalar_t, typename grad_t, bool kMask, bool kBcast>
inline void reduce_run(const grad_t* dy, const scalar_t* z, const uint8_t* mask, int64_t nbytes, int64_t i_abs,
                       int64_t n, const at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* sg,
                       at::opmath_type<scalar_t>* sx, const LaneMask<at::opmath_type<scalar_t>>& lm) {
  using IO = Io<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  static_assert(Io<grad_t>::kBlock == IO::kBlock, "dy and z blocks must match");
  int64_t j = 0;
  V g0(0), g1(0), x0(0), x1(0);
  const V mv(mean[0]);
  for (; j + IO::kBlock <= n; j += IO::kBlock) {
    V ga, gb, a, b;
    load_g<grad_t, kMask>(dy + j, mask, nbytes, i_abs + j, lm, ga, gb);
    IO::load(z + j, a, b);
    if constexpr (kBcast) {
      g0 += ga;
      g1 += gb;
      x0 = at::vec::fmadd(ga, a - mv, x0);
      x1 = at::vec::fmadd(gb, b - mv, x1);
    } else {
      (V::loadu(sg + j) + ga).store(sg + j);
      (V::loadu(sg + j + IO::kV) + gb).store(sg + j + IO::kV);
      at::vec::fmadd(ga, a - V::loadu(mean + j), V::loadu(sx + j)).store(sx + j);
      at::vec::fmadd(gb, b - V::loadu(mean + j + IO::kV), V::loadu(sx + j + IO::kV)).store(sx + j + IO::kV);
    }
  }
  acc_t tg = 0, tx = 0;
  for (; j < n; ++j) {
    const acc_t g = masked1<grad_t, acc_t>(dy, kMask ? mask : nullptr, i_abs, j);
    const acc_t d = static_cast<acc_t>(z[j]) - (kBcast ? mean[0] : mean[j]);
    if constexpr (kBcast) {
      tg += g;
      tx += g * d;
    } else {
      sg[j] += g;
      sx[j] += g * d;
    }
  }
  if constexpr (kBcast) {
    sg[0] += hsum(g0 + g1) + tg;
    sx[0] += hsum(x0 + x1) + tx;
  }
}

// Pass 2 over a run: dz = A*g + B*(z - mean) + D; dres = g.
template <typename scalar_t, typename grad_t, bool kMask, bool kBcast, bool kStats, bool kRes>
inline void grad_run(const grad_t* dy, const scalar_t* z, const uint8_t* mask, int64_t nbytes, int64_t i_abs,
                     int64_t n, const at::opmath_type<scalar_t>* A, const at::opmath_type<scalar_t>* B,
                     const at::opmath_type<scalar_t>* D, const at::opmath_type<scalar_t>* mean, scalar_t* dz,
                     grad_t* dres, const LaneMask<at::opmath_type<scalar_t>>& lm) {
  using IO = Io<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  int64_t j = 0;
  const V av(A[0]), bv(B[0]), dv(D[0]), mv(mean[0]);
  for (; j + IO::kBlock <= n; j += IO::kBlock) {
    V ga, gb;
    load_g<grad_t, kMask>(dy + j, mask, nbytes, i_abs + j, lm, ga, gb);
    if constexpr (kRes) Io<grad_t>::store(dres + j, ga, gb);
    V oa, ob;
    if constexpr (kBcast) {
      oa = ga * av;
      ob = gb * av;
    } else {
      oa = ga * V::loadu(A + j);
      ob = gb * V::loadu(A + j + IO::kV);
    }
    if constexpr (kStats) {
      V a, b;
      IO::load(z + j, a, b);
      if constexpr (kBcast) {
        oa = at::vec::fmadd(a - mv, bv, oa + dv);
        ob = at::vec::fmadd(b - mv, bv, ob + dv);
      } else {
        oa = at::vec::fmadd(a - V::loadu(mean + j), V::loadu(B + j), oa + V::loadu(D + j));
        ob = at::vec::fmadd(b - V::loadu(mean + j + IO::kV), V::loadu(B + j + IO::kV), ob + V::loadu(D + j + IO::kV));
      }
    }
    IO::store(dz + j, oa, ob);
  }
  for (; j < n; ++j) {
    const int64_t c = kBcast ? 0 : j;
    const acc_t g = masked1<grad_t, acc_t>(dy, kMask ? mask : nullptr, i_abs, j);
    if constexpr (kRes) dres[j] = static_cast<grad_t>(g);
    acc_t o = g * A[c];
    if constexpr (kStats) o = (static_cast<acc_t>(z[j]) - mean[c]) * B[c] + (o + D[c]);
    dz[j] = static_cast<scalar_t>(o);
  }
}

template <typename scalar_t, typename grad_t, bool kMask>
void reduce_all(const grad_t* dy, const scalar_t* z, const uint8_t* mask, int64_t nbytes, const Layout& l,
                const at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* sg_out,
                at::opmath_type<scalar_t>* sx_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const LaneMask<acc_t> lm;
  if (l.rows) {
    const int64_t C = l.C, R = l.N * l.S;
    const RowTiles tiles(R, C);
    const int64_t rb = tiles.rows;
    const int64_t nblk = tiles.nblocks;
    std::vector<acc_t> pg(nblk * C, acc_t(0)), px(nblk * C, acc_t(0));
    at::parallel_for(0, tiles.tasks(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t k = t / tiles.ntiles;
        const int64_t c0 = (t % tiles.ntiles) * tiles.width;
        const int64_t w = std::min(C - c0, tiles.width);
        for (int64_t r = k * rb; r < std::min(R, (k + 1) * rb); ++r) {
          const int64_t i = r * C + c0;
          reduce_run<scalar_t, grad_t, kMask, false>(dy + i, z + i, mask, nbytes, i, w, mean + c0,
                                                     pg.data() + k * C + c0, px.data() + k * C + c0, lm);
        }
      }
    });
    // Block partials summed in order, in double: fp32 running sums over
    // millions of values per channel drift (as bn_stats' merges did).
    at::parallel_for(0, C, 64, [&](int64_t cb, int64_t ce) {
      std::vector<double> g(ce - cb, 0.0), x(ce - cb, 0.0);
      for (int64_t k = 0; k < nblk; ++k) {
        const acc_t* bg = pg.data() + k * C;
        const acc_t* bx = px.data() + k * C;
        for (int64_t c = cb; c < ce; ++c) {
          g[c - cb] += static_cast<double>(bg[c]);
          x[c - cb] += static_cast<double>(bx[c]);
        }
      }
      for (int64_t c = cb; c < ce; ++c) {
        sg_out[c] = static_cast<acc_t>(g[c - cb]);
        sx_out[c] = static_cast<acc_t>(x[c - cb]);
      }
    });
  } else {
    const int64_t nseg = (l.S + kPlaneSeg - 1) / kPlaneSeg;
    const int64_t tasks = l.N * l.C * nseg;
    std::vector<acc_t> pg(tasks, acc_t(0)), px(tasks, acc_t(0));
    const int64_t grain = std::max<int64_t>(1, 16384 / std::min(l.S, kPlaneSeg));
    at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t plane = t / nseg, seg = t % nseg;
        const int64_t c = plane % l.C;
        const int64_t i = plane * l.S + seg * kPlaneSeg;
        const int64_t len = std::min(kPlaneSeg, l.S - seg * kPlaneSeg);
        reduce_run<scalar_t, grad_t, kMask, true>(dy + i, z + i, mask, nbytes, i, len, mean + c, &pg[t], &px[t], lm);
      }
    });
    at::parallel_for(0, l.C, 16, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        double g = 0, x = 0;  // in double, as in the rows layout
        for (int64_t nn = 0; nn < l.N; ++nn) {
          for (int64_t s = 0; s < nseg; ++s) {
            g += static_cast<double>(pg[(nn * l.C + c) * nseg + s]);
            x += static_cast<double>(px[(nn * l.C + c) * nseg + s]);
          }
        }
        sg_out[c] = static_cast<acc_t>(g);
        sx_out[c] = static_cast<acc_t>(x);
      }
    });
  }
}

template <typename scalar_t, typename grad_t, bool kMask, bool kStats, bool kRes>
void grad_all(const grad_t* dy, const scalar_t* z, const uint8_t* mask, int64_t nbytes, const Layout& l,
              const at::opmath_type<scalar_t>* A, const at::opmath_type<scalar_t>* B,
              const at::opmath_type<scalar_t>* D, const at::opmath_type<scalar_t>* mean, scalar_t* dz, grad_t* dres) {
  using acc_t = at::opmath_type<scalar_t>;
  const LaneMask<acc_t> lm;
  const int64_t n = l.numel();
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t k = cb; k < ce; ++k) {
      const int64_t e = std::min(n, (k + 1) * kChunk);
      int64_t i = k * kChunk;
      while (i < e) {
        int64_t c, stop;
        if (l.rows) {
          c = i % l.C;
          stop = std::min(e, i + (l.C - c));
        } else {
          const int64_t plane = i / l.S;
          c = plane % l.C;
          stop = std::min(e, (plane + 1) * l.S);
        }
        grad_t* dr = kRes ? dres + i : nullptr;
        if (l.rows) {
          grad_run<scalar_t, grad_t, kMask, false, kStats, kRes>(dy + i, z + i, mask, nbytes, i, stop - i, A + c,
                                                                 B + c, D + c, mean + c, dz + i, dr, lm);
        } else {
          grad_run<scalar_t, grad_t, kMask, true, kStats, kRes>(dy + i, z + i, mask, nbytes, i, stop - i, A + c,
                                                                B + c, D + c, mean + c, dz + i, dr, lm);
        }
        i = stop;
      }
    }
  });
}

// Pass 1 for the whole tensor: sg = sum g, sx = sum g * (z - mean) per channel.
template <typename scalar_t, typename grad_t>
void reduce_impl(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mask, const Layout& l,
                 const at::Tensor& mean, at::opmath_type<scalar_t>* sg, at::opmath_type<scalar_t>* sx) {
  const grad_t* dyp = dy.const_data_ptr<grad_t>();
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const bool has_mask = mask.numel() > 0;
  const uint8_t* mp = has_mask ? mask.const_data_ptr<uint8_t>() : nullptr;
  const auto* meanp = mean.const_data_ptr<at::opmath_type<scalar_t>>();
  if (has_mask) reduce_all<scalar_t, grad_t, true>(dyp, zp, mp, mask.numel(), l, meanp, sg, sx);
  else reduce_all<scalar_t, grad_t, false>(dyp, zp, mp, mask.numel(), l, meanp, sg, sx);
}

// Pass 2 for the whole tensor with per-channel coefficients:
// dz = A*g [+ B*(z - mean) + D when kStats], dres = g when dres is defined.
template <typename scalar_t, typename grad_t>
void grad_impl(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mask, const Layout& l,
               const at::Tensor& mean, const at::opmath_type<scalar_t>* A, const at::opmath_type<scalar_t>* B,
               const at::opmath_type<scalar_t>* D, bool batch_stats, at::Tensor& dz, at::Tensor& dres) {
  const grad_t* dyp = dy.const_data_ptr<grad_t>();
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const bool has_mask = mask.numel() > 0;
  const uint8_t* mp = has_mask ? mask.const_data_ptr<uint8_t>() : nullptr;
  const int64_t nbytes = mask.numel();
  const auto* meanp = mean.const_data_ptr<at::opmath_type<scalar_t>>();
  scalar_t* dzp = dz.mutable_data_ptr<scalar_t>();
  grad_t* drp = dres.defined() ? dres.mutable_data_ptr<grad_t>() : nullptr;
  // Dispatch the three flags to compile-time constants.
  auto go = [&](auto kMask, auto kStats, auto kRes) {
    grad_all<scalar_t, grad_t, decltype(kMask)::value, decltype(kStats)::value, decltype(kRes)::value>(
        dyp, zp, mp, nbytes, l, A, B, D, meanp, dzp, drp);
  };
  using T = std::true_type;
  using F = std::false_type;
  const bool r = drp != nullptr;
  if (has_mask) {
    if (batch_stats) r ? go(T{}, T{}, T{}) : go(T{}, T{}, F{});
    else r ? go(T{}, F{}, T{}) : go(T{}, F{}, F{});
  } else {
    if (batch_stats) r ? go(F{}, T{}, T{}) : go(F{}, T{}, F{});
    else r ? go(F{}, F{}, T{}) : go(F{}, F{}, F{});
  }
}

// Pass 2's coefficients from the sums over `count` values per channel:
// A = w * invstd, B = -A * invstd * dweight / count, D = -A * dbias / count,
// with dbias = sum g and dweight = sum g * xhat (zero B, D without batch stats).
template <typename acc_t>
void grad_coefficients(int64_t C, const acc_t* invstd, const acc_t* w, const acc_t* dbias, const acc_t* dweight,
                       double count, bool batch_stats, acc_t* A, acc_t* B, acc_t* D) {
  const acc_t inv_m = acc_t(1) / static_cast<acc_t>(count);
  for (int64_t c = 0; c < C; ++c) {
    A[c] = (w ? w[c] : acc_t(1)) * invstd[c];
    B[c] = batch_stats ? -A[c] * invstd[c] * dweight[c] * inv_m : acc_t(0);
    D[c] = batch_stats ? -A[c] * dbias[c] * inv_m : acc_t(0);
  }
}

template <typename scalar_t, typename grad_t>
void backward_impl(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mask, const Layout& l,
                   const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight, bool batch_stats,
                   at::Tensor& dz, at::Tensor& dres, at::Tensor& dweight, at::Tensor& dbias) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* isp = invstd.const_data_ptr<acc_t>();
  acc_t* dwp = dweight.mutable_data_ptr<acc_t>();
  acc_t* dbp = dbias.mutable_data_ptr<acc_t>();
  const int64_t C = l.C;
  std::vector<acc_t> sx(C);
  reduce_impl<scalar_t, grad_t>(dy, z, mask, l, mean, dbp, sx.data());
  for (int64_t c = 0; c < C; ++c) dwp[c] = sx[c] * isp[c];
  std::vector<acc_t> A(C), B(C), D(C);
  grad_coefficients<acc_t>(C, isp, weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr, dbp, dwp,
                           static_cast<double>(l.count()), batch_stats, A.data(), B.data(), D.data());
  grad_impl<scalar_t, grad_t>(dy, z, mask, l, mean, A.data(), B.data(), D.data(), batch_stats, dz, dres);
}

// The checks shared by the backward ops.
void check_backward_args(const char* op, const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mask,
                         const at::Tensor& mean, const at::Tensor& invstd, const c10::optional<at::Tensor>& weight) {
  check_z(z, op);
  const int64_t C = z.size(1);
  check_cpu(dy, op, "dy");
  check_floating(dy, "dy");
  check_same_shape(z, "z", dy, "dy");
  check_channel_vec(mean, op, "mean", C);
  check_channel_vec(invstd, op, "invstd", C);
  if (weight.has_value()) check_channel_vec(*weight, op, "weight", C);
  check_cpu(mask, op, "mask");
  TORCH_CHECK(mask.scalar_type() == at::kByte, "fused_resnet.", op, ": `mask` must be uint8, got ",
              mask.scalar_type());
  const int64_t n = z.numel();
  TORCH_CHECK(mask.numel() == 0 || (mask.dim() == 1 && mask.numel() == (n + 7) / 8), "fused_resnet.", op,
              ": `mask` must be empty (no ReLU) or hold ceil(numel(z) / 8) = ", (n + 7) / 8, " bytes, got shape ",
              mask.sizes());
}

// The operands of the three backward ops after the checks, in the layouts
// and dtypes the kernels read: z in its compute format, per-channel vectors
// in op-math precision, dy in z's dtype where it already is (the fast path)
// or else in op-math precision (the reference's g = dy.to(acc)).
struct BackwardOperands {
  at::Tensor z, dy, mask, mean, invstd, weight;
  at::MemoryFormat fmt;
  Layout layout;
  at::ScalarType stat;
  bool dy_same_dtype;
  int64_t C;

  BackwardOperands(const char* op, const at::Tensor& dy_in, const at::Tensor& z_in, const at::Tensor& mask_in,
                   const at::Tensor& mean_in, const at::Tensor& invstd_in,
                   const c10::optional<at::Tensor>& weight_in) {
    check_backward_args(op, dy_in, z_in, mask_in, mean_in, invstd_in, weight_in);
    C = z_in.size(1);
    stat = stat_type(z_in.scalar_type());
    fmt = compute_format(z_in);
    z = z_in.contiguous(fmt);
    layout = layout_of(z, fmt);
    mask = mask_in.contiguous();
    mean = mean_in.to(stat).contiguous();
    invstd = invstd_in.to(stat).contiguous();
    if (weight_in.has_value()) weight = weight_in->to(stat).contiguous();
    dy_same_dtype = dy_in.scalar_type() == z.scalar_type();
    dy = (dy_same_dtype ? dy_in : dy_in.to(stat)).contiguous(fmt);
  }

  // dz in z's layout, and dres in dy's (or an undefined tensor).
  at::Tensor new_dz() const { return cached_empty(z.sizes(), z.scalar_type(), fmt); }
  at::Tensor new_dres(bool need) const { return need ? cached_empty(dy.sizes(), dy.scalar_type(), fmt) : at::Tensor(); }
};

// dres as the op returns it: empty when not wanted, else in dy's dtype.
at::Tensor finish_dres(at::Tensor dres, bool need, const at::Tensor& dy_in, bool dy_same_dtype) {
  if (!need) return at::empty({0}, dy_in.options());
  return dy_same_dtype ? dres : dres.to(dy_in.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_cpu(
    const at::Tensor& dy_in, const at::Tensor& z_in, const at::Tensor& mask, const at::Tensor& mean,
    const at::Tensor& invstd, const c10::optional<at::Tensor>& weight, bool batch_stats, bool need_residual_grad) {
  const BackwardOperands o("bn_backward", dy_in, z_in, mask, mean, invstd, weight);
  at::Tensor dz = o.new_dz();
  at::Tensor dres = o.new_dres(need_residual_grad);
  at::Tensor dweight = at::empty({o.C}, o.z.options().dtype(o.stat));
  at::Tensor dbias = at::empty({o.C}, o.z.options().dtype(o.stat));
  if (o.z.numel() == 0) {
    dweight.zero_();
    dbias.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.z.scalar_type(), "bn_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if (o.dy_same_dtype) {
        backward_impl<scalar_t, scalar_t>(o.dy, o.z, o.mask, o.layout, o.mean, o.invstd, o.weight, batch_stats, dz,
                                          dres, dweight, dbias);
      } else {
        backward_impl<scalar_t, acc_t>(o.dy, o.z, o.mask, o.layout, o.mean, o.invstd, o.weight, batch_stats, dz,
                                       dres, dweight, dbias);
      }
    });
  }
  return {dz, finish_dres(dres, need_residual_grad, dy_in, o.dy_same_dtype), dweight, dbias};
}

// Synchronised BatchNorm's backward, split at the point where the per-channel
// sums are all-reduced across processes (nn.SyncBatchNorm's
// batch_norm_backward_reduce / _elemt): pass 1 alone, then pass 2 alone with
// sums and a count that cover every process's batch.
std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cpu(const at::Tensor& dy_in, const at::Tensor& z_in,
                                                          const at::Tensor& mask, const at::Tensor& mean,
                                                          const at::Tensor& invstd) {
  const BackwardOperands o("bn_backward_reduce", dy_in, z_in, mask, mean, invstd, c10::nullopt);
  at::Tensor sum_dy = at::zeros({o.C}, o.z.options().dtype(o.stat));
  at::Tensor sum_dy_xhat = at::zeros({o.C}, o.z.options().dtype(o.stat));
  if (o.z.numel() == 0) return {sum_dy, sum_dy_xhat};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.z.scalar_type(), "bn_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* sg = sum_dy.mutable_data_ptr<acc_t>();
    acc_t* sx = sum_dy_xhat.mutable_data_ptr<acc_t>();
    if (o.dy_same_dtype) reduce_impl<scalar_t, scalar_t>(o.dy, o.z, o.mask, o.layout, o.mean, sg, sx);
    else reduce_impl<scalar_t, acc_t>(o.dy, o.z, o.mask, o.layout, o.mean, sg, sx);
    const acc_t* isp = o.invstd.const_data_ptr<acc_t>();
    for (int64_t c = 0; c < o.C; ++c) sx[c] *= isp[c];
  });
  return {sum_dy, sum_dy_xhat};
}

std::tuple<at::Tensor, at::Tensor> bn_backward_elemt_cpu(const at::Tensor& dy_in, const at::Tensor& z_in,
                                                         const at::Tensor& mask, const at::Tensor& mean,
                                                         const at::Tensor& invstd,
                                                         const c10::optional<at::Tensor>& weight,
                                                         const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat,
                                                         int64_t count, bool need_residual_grad) {
  const BackwardOperands o("bn_backward_elemt", dy_in, z_in, mask, mean, invstd, weight);
  check_channel_vec(sum_dy, "bn_backward_elemt", "sum_dy", o.C);
  check_channel_vec(sum_dy_xhat, "bn_backward_elemt", "sum_dy_xhat", o.C);
  TORCH_CHECK(count > 0 || o.z.numel() == 0, "fused_resnet.bn_backward_elemt: `count` (values per channel over "
              "every process) must be positive, got ", count);
  const at::Tensor sg = sum_dy.to(o.stat).contiguous();
  const at::Tensor sx = sum_dy_xhat.to(o.stat).contiguous();
  at::Tensor dz = o.new_dz();
  at::Tensor dres = o.new_dres(need_residual_grad);
  if (o.z.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.z.scalar_type(), "bn_backward_elemt_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t C = o.C;
      std::vector<acc_t> A(C), B(C), D(C);
      grad_coefficients<acc_t>(C, o.invstd.const_data_ptr<acc_t>(),
                               o.weight.defined() ? o.weight.const_data_ptr<acc_t>() : nullptr,
                               sg.const_data_ptr<acc_t>(), sx.const_data_ptr<acc_t>(), static_cast<double>(count),
                               true, A.data(), B.data(), D.data());
      if (o.dy_same_dtype) {
        grad_impl<scalar_t, scalar_t>(o.dy, o.z, o.mask, o.layout, o.mean, A.data(), B.data(), D.data(), true, dz,
                                      dres);
      } else {
        grad_impl<scalar_t, acc_t>(o.dy, o.z, o.mask, o.layout, o.mean, A.data(), B.data(), D.data(), true, dz, dres);
      }
    });
  }
  return {dz, finish_dres(dres, need_residual_grad, dy_in, o.dy_same_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("bn_backward", &bn_backward_cpu);
  m.impl("bn_backward_reduce", &bn_backward_reduce_cpu);
  m.impl("bn_backward_elemt", &bn_backward_elemt_cpu);
}

}  // namespace bn
}  // namespace fused_resnet
