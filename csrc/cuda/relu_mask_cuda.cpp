// CUDA dispatch of fused_resnet::relu_mask (checks here, kernel in relu_mask_kernel.cu).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../fused_resnet.h"
#include "dtype.h"

namespace fused_resnet {
namespace {

at::Tensor relu_mask_cuda(const at::Tensor& y_in) {
  check_floating(y_in, "y");
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous(compute_format(y_in));
  at::Tensor mask = at::empty({(y.numel() + 7) / 8}, y.options().dtype(at::kByte));
  C10_CUDA_CHECK(relu_mask_launch(to_kernel_dtype(y.scalar_type(), "y"), y.const_data_ptr(),
                                  mask.mutable_data_ptr<uint8_t>(), y.numel(), num_sms(),
                                  at::cuda::getCurrentCUDAStream()));
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("relu_mask", &relu_mask_cuda);
}

}  // namespace fused_resnet
