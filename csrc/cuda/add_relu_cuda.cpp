// CUDA dispatch of fused_resnet::add_relu (checks here, kernel in add_relu_kernel.cu).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../fused_resnet.h"
#include "dtype.h"

namespace fused_resnet {
namespace {

at::Tensor add_relu_cuda(const at::Tensor& x, const at::Tensor& residual) {
  check_floating(x, "x");
  check_same_device(x, "x", residual, "residual");
  TORCH_CHECK(
      residual.scalar_type() == x.scalar_type(), "fused_resnet.add_relu: `residual` has dtype ",
      residual.scalar_type(), " but `x` has dtype ", x.scalar_type(), "; expected the same dtype");
  check_same_shape(x, "x", residual, "residual");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = compute_format(x);
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor rc = residual.contiguous(fmt);
  at::Tensor y = at::empty_like(xc, xc.options(), fmt);
  C10_CUDA_CHECK(add_relu_launch(to_kernel_dtype(x.scalar_type(), "x"), xc.const_data_ptr(), rc.const_data_ptr(),
                                 y.mutable_data_ptr(), xc.numel(), num_sms(), at::cuda::getCurrentCUDAStream()));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("add_relu", &add_relu_cuda);
}

}  // namespace fused_resnet
