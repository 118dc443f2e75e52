// CPU fused_resnet::max_pool2d: nn.MaxPool2d's output without the int64
// indices tensor aten computes alongside it on CPU (twice the output's bytes,
// only needed for a backward). For inference after a ResNet's stem, where
// the stem output, the pooled output and those indices together set the
// forward's peak memory.
//
// Semantics are F.max_pool2d's: windows over the input only (padding never
// wins), NaN propagates, output size with floor or ceil mode. channels_last
// is vectorised across channels; NCHW walks each plane.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../fused_resnet.h"
#include "output_cache.h"

namespace fused_resnet {
namespace {

using at::vec::Vectorized;

struct Pool {
  int64_t k[2], s[2], p[2], d[2];
  int64_t in[2], out[2];
};

int64_t pooled_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  const int64_t span = in + 2 * p - d * (k - 1) - 1;
  int64_t out = (span + (ceil_mode ? s - 1 : 0)) / s + 1;
  // PyTorch's rule: the last window must start inside the input or left padding.
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  return out;
}

template <typename scalar_t>
inline bool wins(scalar_t v, scalar_t best) {
  // `>` alone would never pick a NaN; eager's kernel takes it.
  return v > best || std::isnan(static_cast<double>(v));
}

template <typename scalar_t>
void pool_channels_last(const scalar_t* x, scalar_t* y, int64_t N, int64_t C, const Pool& q) {
  using V = Vectorized<scalar_t>;
  const int64_t H = q.in[0], W = q.in[1], OH = q.out[0], OW = q.out[1];
  at::parallel_for(0, N * OH * OW, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const int64_t ow = o % OW, oh = (o / OW) % OH, n = o / (OW * OH);
      scalar_t* out = y + o * C;
      const int64_t h0 = oh * q.s[0] - q.p[0], w0 = ow * q.s[1] - q.p[1];
      bool first = true;
      for (int64_t i = 0; i < q.k[0]; ++i) {
        const int64_t h = h0 + i * q.d[0];
        if (h < 0 || h >= H) continue;
        for (int64_t j = 0; j < q.k[1]; ++j) {
          const int64_t w = w0 + j * q.d[1];
          if (w < 0 || w >= W) continue;
          const scalar_t* in = x + ((n * H + h) * W + w) * C;
          if (first) {
            std::copy(in, in + C, out);
            first = false;
            continue;
          }
          int64_t c = 0;
          for (; c + V::size() <= C; c += V::size()) {
            // at::vec::maximum propagates NaN, as eager's comparison does.
            at::vec::maximum(V::loadu(out + c), V::loadu(in + c)).store(out + c);
          }
          for (; c < C; ++c) {
            if (wins(in[c], out[c])) out[c] = in[c];
          }
        }
      }
      if (first) std::fill(out, out + C, -std::numeric_limits<scalar_t>::infinity());
    }
  });
}

template <typename scalar_t>
void pool_planes(const scalar_t* x, scalar_t* y, int64_t planes, const Pool& q) {
  const int64_t H = q.in[0], W = q.in[1], OH = q.out[0], OW = q.out[1];
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pl = begin; pl < end; ++pl) {
      const scalar_t* in = x + pl * H * W;
      scalar_t* out = y + pl * OH * OW;
      for (int64_t oh = 0; oh < OH; ++oh) {
        for (int64_t ow = 0; ow < OW; ++ow) {
          scalar_t best = -std::numeric_limits<scalar_t>::infinity();
          for (int64_t i = 0; i < q.k[0]; ++i) {
            const int64_t h = oh * q.s[0] - q.p[0] + i * q.d[0];
            if (h < 0 || h >= H) continue;
            for (int64_t j = 0; j < q.k[1]; ++j) {
              const int64_t w = ow * q.s[1] - q.p[1] + j * q.d[1];
              if (w < 0 || w >= W) continue;
              const scalar_t v = in[h * W + w];
              if (wins(v, best)) best = v;
            }
          }
          out[oh * OW + ow] = best;
        }
      }
    }
  });
}

at::Tensor max_pool2d_cpu(const at::Tensor& x_in, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  TORCH_CHECK(x_in.device().is_cpu(), "fused_resnet.max_pool2d: `x` is on ", x_in.device(),
              "; the CPU kernel expects a CPU tensor");
  check_floating(x_in, "x");
  TORCH_CHECK(x_in.dim() == 4, "fused_resnet.max_pool2d: `x` must be 4-D (N, C, H, W), got shape ", x_in.sizes());
  auto two = [](at::IntArrayRef v, const char* name) {
    TORCH_CHECK(v.size() == 2, "fused_resnet.max_pool2d: `", name, "` must hold 2 values, got ", v);
  };
  two(kernel_size, "kernel_size");
  two(stride, "stride");
  two(padding, "padding");
  two(dilation, "dilation");
  Pool q;
  for (int a = 0; a < 2; ++a) {
    q.k[a] = kernel_size[a];
    q.s[a] = stride[a];
    q.p[a] = padding[a];
    q.d[a] = dilation[a];
    TORCH_CHECK(q.k[a] > 0 && q.s[a] > 0 && q.d[a] > 0, "fused_resnet.max_pool2d: `kernel_size`, `stride` and "
                "`dilation` must be positive, got ", kernel_size, ", ", stride, ", ", dilation);
    TORCH_CHECK(q.p[a] >= 0 && q.p[a] <= q.k[a] / 2, "fused_resnet.max_pool2d: `padding` must be between 0 and "
                "half the kernel size, got padding ", padding, " for kernel_size ", kernel_size);
    q.in[a] = x_in.size(2 + a);
    q.out[a] = pooled_size(q.in[a], q.k[a], q.s[a], q.p[a], q.d[a], ceil_mode);
    TORCH_CHECK(q.out[a] > 0, "fused_resnet.max_pool2d: the output would be empty: input ", x_in.sizes(),
                " with kernel_size ", kernel_size, ", stride ", stride, ", padding ", padding, ", dilation ",
                dilation);
  }
  const auto fmt = compute_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor y = cached_empty({N, C, q.out[0], q.out[1]}, x.scalar_type(), fmt);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d_cpu", [&] {
    if (fmt == at::MemoryFormat::ChannelsLast) {
      pool_channels_last<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), N, C, q);
    } else {
      pool_planes<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), N * C, q);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("max_pool2d", &max_pool2d_cpu);
}

}  // namespace fused_resnet
