// CPU fused_resnet::bn_apply: y = [relu](z * scale[c] + shift[c] [+ residual])
// and the bit-packed ReLU mask, in one pass over memory.
//
// Rounding follows eager (nn.BatchNorm2d, then `out += identity`, then ReLU):
// the BN result is rounded to z's dtype, the residual is added in z's dtype.
// Memory is walked in fixed chunks of kChunk elements (whole mask bytes per
// chunk); inside a chunk, runs of one channel (planes) or runs across the
// channels of a row (rows) are vectorised. The mask of a chunk is packed from
// the y just written, while it is still in L1.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "bn_common.h"
#include "output_cache.h"

namespace fused_resnet {
namespace bn {
namespace {

// One run of n elements. kBcast: scale/shift are one value (a plane);
// otherwise per element (a row, channels consecutive).
template <typename scalar_t, bool kBcast, bool kRes, bool kRelu>
inline void apply_run(const scalar_t* z, const scalar_t* r, scalar_t* y, int64_t n,
                      const at::opmath_type<scalar_t>* sc, const at::opmath_type<scalar_t>* sh) {
  using IO = Io<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  int64_t j = 0;
  const V sv(sc[0]), tv(sh[0]);
  for (; j + IO::kBlock <= n; j += IO::kBlock) {
    V a, b;
    IO::load(z + j, a, b);
    if constexpr (kBcast) {
      a = at::vec::fmadd(a, sv, tv);
      b = at::vec::fmadd(b, sv, tv);
    } else {
      a = at::vec::fmadd(a, V::loadu(sc + j), V::loadu(sh + j));
      b = at::vec::fmadd(b, V::loadu(sc + j + IO::kV), V::loadu(sh + j + IO::kV));
    }
    if constexpr (kRes) {
      IO::round(a, b);
      V ra, rb;
      IO::load(r + j, ra, rb);
      a = a + ra;
      b = b + rb;
    }
    if constexpr (kRelu) {
      a = relu_keep_nan(a);
      b = relu_keep_nan(b);
    }
    IO::store(y + j, a, b);
  }
  for (; j < n; ++j) {
    const acc_t s = kBcast ? sc[0] : sc[j];
    const acc_t t = kBcast ? sh[0] : sh[j];
    acc_t v = static_cast<acc_t>(z[j]) * s + t;
    if constexpr (kRes) v = IO::round1(v) + static_cast<acc_t>(r[j]);
    if constexpr (kRelu) v = v < acc_t(0) ? acc_t(0) : v;
    y[j] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, bool kRes, bool kRelu>
void apply_all(const scalar_t* z, const scalar_t* r, scalar_t* y, uint8_t* mask, const Layout& l,
               const at::opmath_type<scalar_t>* sc, const at::opmath_type<scalar_t>* sh) {
  const int64_t n = l.numel();
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t k = cb; k < ce; ++k) {
      const int64_t b = k * kChunk, e = std::min(n, b + kChunk);
      int64_t i = b;
      while (i < e) {
        if (l.rows) {
          const int64_t c = i % l.C;
          const int64_t stop = std::min(e, i + (l.C - c));
          apply_run<scalar_t, false, kRes, kRelu>(z + i, r ? r + i : nullptr, y + i, stop - i, sc + c, sh + c);
          i = stop;
        } else {
          const int64_t plane = i / l.S;
          const int64_t c = plane % l.C;
          const int64_t stop = std::min(e, (plane + 1) * l.S);
          apply_run<scalar_t, true, kRes, kRelu>(z + i, r ? r + i : nullptr, y + i, stop - i, sc + c, sh + c);
          i = stop;
        }
      }
      if constexpr (kRelu) pack_relu_mask<scalar_t>(y + b, mask + (b >> 3), e - b);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bn_apply_cpu(const at::Tensor& z_in, const at::Tensor& scale,
                                                const at::Tensor& shift, const c10::optional<at::Tensor>& residual,
                                                bool relu, c10::optional<at::ScalarType> out_dtype) {
  check_z(z_in, "bn_apply");
  const int64_t C = z_in.size(1);
  check_channel_vec(scale, "bn_apply", "scale", C);
  check_channel_vec(shift, "bn_apply", "shift", C);
  const auto fmt = compute_format(z_in);
  const at::Tensor z = z_in.contiguous(fmt);
  const Layout l = layout_of(z, fmt);
  const auto st = stat_type(z.scalar_type());
  // Parameters in op-math precision; no copy in the usual fp32 case.
  const at::Tensor sc = scale.to(st).contiguous();
  const at::Tensor sh = shift.to(st).contiguous();
  at::Tensor r;
  if (residual.has_value()) {
    check_cpu(*residual, "bn_apply", "residual");
    check_floating(*residual, "residual");
    check_same_shape(z_in, "z", *residual, "residual");
    // Eager adds the residual in z's dtype; a residual in another dtype or
    // layout is converted once (the fast path is matching dtype and layout).
    r = residual->to(z.scalar_type()).contiguous(fmt);
  }
  at::ScalarType odt = out_dtype.value_or(z.scalar_type());
  TORCH_CHECK(odt == at::kFloat || odt == at::kHalf || odt == at::kBFloat16 || odt == at::kDouble,
              "fused_resnet.bn_apply: `out_dtype` must be float32, float16, bfloat16 or float64, got ", odt);

  at::Tensor y = cached_empty(z.sizes(), z.scalar_type(), fmt);
  const int64_t n = z.numel();
  at::Tensor mask = cached_empty({relu ? (n + 7) / 8 : 0}, at::kByte, at::MemoryFormat::Contiguous);
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bn_apply_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      const scalar_t* rp = r.defined() ? r.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* yp = y.mutable_data_ptr<scalar_t>();
      uint8_t* mp = relu ? mask.mutable_data_ptr<uint8_t>() : nullptr;
      const acc_t* scp = sc.const_data_ptr<acc_t>();
      const acc_t* shp = sh.const_data_ptr<acc_t>();
      if (rp && relu) apply_all<scalar_t, true, true>(zp, rp, yp, mp, l, scp, shp);
      else if (rp) apply_all<scalar_t, true, false>(zp, rp, yp, mp, l, scp, shp);
      else if (relu) apply_all<scalar_t, false, true>(zp, rp, yp, mp, l, scp, shp);
      else apply_all<scalar_t, false, false>(zp, rp, yp, mp, l, scp, shp);
    });
  }
  if (odt != z.scalar_type()) {
    // y is computed in z's dtype and cast, as the reference does; the mask
    // must describe the cast values (a tiny positive may underflow to 0).
    y = y.to(odt);
    if (relu && n > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, odt, "bn_apply_cpu_mask", [&] {
        pack_relu_mask_all<scalar_t>(y.const_data_ptr<scalar_t>(), mask.mutable_data_ptr<uint8_t>(), n);
      });
    }
  }
  return {y, mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("bn_apply", &bn_apply_cpu);
}

}  // namespace bn
}  // namespace fused_resnet
