// CPU fused_resnet::relu_mask: the 1-bit ReLU mask !(y <= 0) of a ReLU output,
// packed as bn_apply packs it (bit i of byte i / 8 for element i, elements in
// y's memory order). Lets the fused backward run from the ReLU output that
// the next conv saves anyway (set_relu_saves("output")): one read of y and a
// write of 1/32 of its bytes, instead of a masked copy of dy.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "bn_common.h"
#include "output_cache.h"

namespace fused_resnet {
namespace bn {
namespace {

at::Tensor relu_mask_cpu(const at::Tensor& y_in) {
  check_cpu(y_in, "relu_mask", "y");
  check_floating(y_in, "y");
  const at::Tensor y = y_in.contiguous(compute_format(y_in));
  const int64_t n = y.numel();
  at::Tensor mask = cached_empty({(n + 7) / 8}, at::kByte, at::MemoryFormat::Contiguous);
  if (n == 0) return mask;
  // !(y <= 0): eager's ReLU backward from its output zeroes the gradient
  // where y <= 0, so a NaN output lets the gradient through.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "relu_mask_cpu", [&] {
    pack_relu_mask_all<scalar_t, true>(y.const_data_ptr<scalar_t>(), mask.mutable_data_ptr<uint8_t>(), n);
  });
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("relu_mask", &relu_mask_cpu);
}

}  // namespace bn
}  // namespace fused_resnet
