// CPU fused_resnet::relu_mask: the 1-bit ReLU mask !(y <= 0) of a ReLU output,
// packed as bn_apply packs it (bit i of byte i / 8 for element i, elements in
// y's memory order). Lets the fused backward run from the ReLU output that
// the next conv saves anyway (set_relu_saves("output")): one read of y and a
// write of 1/32 of its bytes, instead of a masked copy of dy.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "bn_common.h"

namespace fused_resnet {
namespace bn {
namespace {

// Bits of !(y <= 0) for n values starting at a multiple of 8: eager's ReLU
// backward from its output (threshold_backward) zeroes the gradient where
// y <= 0, so a NaN output lets the gradient through, as here.
template <typename scalar_t>
void pack_not_nonpositive(const scalar_t* y, uint8_t* mask, int64_t n) {
  using IO = Io<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  const V zero(0);
  int64_t j = 0;
  for (; j + IO::kBlock <= n; j += IO::kBlock) {
    V a, b;
    IO::load(y + j, a, b);
    // zero_mask: one bit per lane whose comparison is false.
    const uint64_t bits = static_cast<uint64_t>(static_cast<uint32_t>((a <= zero).zero_mask())) |
                          (static_cast<uint64_t>(static_cast<uint32_t>((b <= zero).zero_mask())) << IO::kV);
    for (int64_t k = 0; k < IO::kBlock / 8; ++k) mask[(j >> 3) + k] = static_cast<uint8_t>(bits >> (8 * k));
  }
  for (; j < n; j += 8) {
    uint8_t byte = 0;
    for (int64_t k = 0; k < 8 && j + k < n; ++k) {
      if (!(static_cast<acc_t>(y[j + k]) <= acc_t(0))) byte |= static_cast<uint8_t>(1u << k);
    }
    mask[j >> 3] = byte;
  }
}

at::Tensor relu_mask_cpu(const at::Tensor& y_in) {
  check_cpu(y_in, "relu_mask", "y");
  check_floating(y_in, "y");
  const at::Tensor y = y_in.contiguous(compute_format(y_in));
  const int64_t n = y.numel();
  at::Tensor mask = at::empty({(n + 7) / 8}, y.options().dtype(at::kByte));
  if (n == 0) return mask;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "relu_mask_cpu", [&] {
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    uint8_t* mp = mask.mutable_data_ptr<uint8_t>();
    const int64_t nchunks = (n + kChunk - 1) / kChunk;
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t k = cb; k < ce; ++k) {
        const int64_t b = k * kChunk, e = std::min(n, b + kChunk);
        pack_not_nonpositive<scalar_t>(yp + b, mp + (b >> 3), e - b);
      }
    });
  });
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("relu_mask", &relu_mask_cpu);
}

}  // namespace bn
}  // namespace fused_resnet
