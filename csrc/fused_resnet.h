// Shared argument checks for the fused_resnet ops: every error names the
// argument and what was expected, so users never get a bare crash.
#pragma once

#include <ATen/ATen.h>

namespace fused_resnet {

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(
      dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
      "fused_resnet: `", name, "` must be float32, float16, bfloat16 or float64, got ", dt);
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(
      a.device() == b.device(), "fused_resnet: `", b_name, "` is on ", b.device(), " but `", a_name, "` is on ",
      a.device(), "; expected both on the same device");
}

inline void check_same_shape(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(
      a.sizes() == b.sizes(), "fused_resnet: `", b_name, "` has shape ", b.sizes(), " but `", a_name, "` has shape ",
      a.sizes(), "; expected equal shapes");
}

// The memory format we compute in: channels_last when the tensor is laid out
// that way, otherwise contiguous (NCHW).
inline at::MemoryFormat compute_format(const at::Tensor& t) {
  if (t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

}  // namespace fused_resnet
