// CPU implementation of fused_resnet::add_relu: y = relu(x + residual) in one
// pass, in x's memory format.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../fused_resnet.h"
#include "output_cache.h"

namespace fused_resnet {
namespace {

at::Tensor add_relu_cpu(const at::Tensor& x, const at::Tensor& residual) {
  check_floating(x, "x");
  check_same_device(x, "x", residual, "residual");
  TORCH_CHECK(
      residual.scalar_type() == x.scalar_type(), "fused_resnet.add_relu: `residual` has dtype ",
      residual.scalar_type(), " but `x` has dtype ", x.scalar_type(), "; expected the same dtype");
  check_same_shape(x, "x", residual, "residual");
  const auto fmt = compute_format(x);
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor rc = residual.contiguous(fmt);
  at::Tensor y = cached_empty(xc.sizes(), xc.scalar_type(), fmt);
  const int64_t n = xc.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_relu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* rp = rc.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        // Sum in the op-math type, round once: eager rounds x + r to scalar_t,
        // then relu is exact, so this is bit-identical to eager.
        const acc_t v = static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(xp[i]) + static_cast<acc_t>(rp[i])));
        // `v > 0 ? v : 0` would turn NaN into 0; eager's relu keeps NaN.
        yp[i] = static_cast<scalar_t>(v < acc_t(0) ? acc_t(0) : v);
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("add_relu", &add_relu_cpu);
}

}  // namespace fused_resnet
