// CUDA dispatch of the BatchNorm ops (bn_stats, bn_finalize, bn_apply,
// bn_backward and its split halves): argument checks, layout, allocation through torch, then the
// torch-free launchers of bn_*_kernel.cu on the current stream. One file for
// the four ops because every torch-header translation unit costs ~50 s to
// build. Nothing here synchronises with the host (CUDA-graph safe).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../fused_resnet.h"
#include "dtype.h"

namespace fused_resnet {
namespace {

at::ScalarType stat_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// z's memory seen as [outer, C, inner]: channels_last is [N*H*W, C, 1].
BnShape shape_of(const at::Tensor& zc, at::MemoryFormat fmt) {
  const int64_t C = zc.size(1);
  if (fmt == at::MemoryFormat::ChannelsLast) return BnShape{zc.size(0) * zc.size(2) * zc.size(3), C, 1};
  int64_t inner = 1;
  for (int64_t d = 2; d < zc.dim(); ++d) inner *= zc.size(d);
  return BnShape{zc.size(0), C, inner};
}

void check_input(const at::Tensor& z, const char* op, const char* name) {
  check_floating(z, name);
  TORCH_CHECK(z.is_cuda(), "fused_resnet.", op, ": `", name, "` must be a CUDA tensor, got ", z.device());
  TORCH_CHECK(z.dim() >= 2, "fused_resnet.", op, ": `", name, "` must have at least 2 dims (N, C, ...), got shape ",
              z.sizes());
  TORCH_CHECK(z.size(1) <= std::numeric_limits<int32_t>::max(), "fused_resnet.", op, ": `", name,
              "` has too many channels (", z.size(1), ")");
}

// A per-channel vector (C values) in dtype `to`, contiguous, on z's device.
at::Tensor per_channel(const at::Tensor& t, const at::Tensor& like, int64_t C, at::ScalarType to, const char* op,
                       const char* name) {
  check_floating(t, name);
  check_same_device(like, "z", t, name);
  TORCH_CHECK(t.numel() == C, "fused_resnet.", op, ": `", name, "` must hold one value per channel (", C,
              "), got shape ", t.sizes());
  return t.reshape({C}).to(to).contiguous();
}

at::Tensor partial_buffer(int64_t C, at::ScalarType acc, const at::Tensor& like) {
  return at::empty({2 * bn_max_partials(num_sms()) * C}, like.options().dtype(acc));
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& z) {
  check_input(z, "bn_stats", "z");
  const c10::cuda::CUDAGuard guard(z.device());
  const auto fmt = compute_format(z);
  const at::Tensor zc = z.contiguous(fmt);
  const BnShape s = shape_of(zc, fmt);
  const auto acc = stat_type(z.scalar_type());
  at::Tensor mean = at::empty({s.channels}, z.options().dtype(acc));
  at::Tensor var = at::empty({s.channels}, z.options().dtype(acc));
  at::Tensor partials = partial_buffer(s.channels, acc, z);
  C10_CUDA_CHECK(bn_stats_launch(to_kernel_dtype(z.scalar_type(), "z"), zc.const_data_ptr(), s,
                                 partials.mutable_data_ptr(), mean.mutable_data_ptr(), var.mutable_data_ptr(),
                                 num_sms(), at::cuda::getCurrentCUDAStream()));
  return {mean, var};
}

BnParam param_of(const at::Tensor& t, const char* name) {
  if (!t.defined()) return BnParam{nullptr, DType::kFloat32};
  return BnParam{t.const_data_ptr(), to_kernel_dtype(t.scalar_type(), name)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_finalize_cuda(
    const at::Tensor& mean, const at::Tensor& var, int64_t count, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& num_batches_tracked,
    std::optional<double> momentum, double eps) {
  const auto sdt = mean.scalar_type();
  TORCH_CHECK(sdt == at::kFloat || sdt == at::kDouble,
              "fused_resnet.bn_finalize: `mean` must be float32 or float64 (the statistics dtype), got ", sdt);
  TORCH_CHECK(var.scalar_type() == sdt, "fused_resnet.bn_finalize: `var` has dtype ", var.scalar_type(),
              " but `mean` has dtype ", sdt, "; expected the same dtype");
  TORCH_CHECK(mean.is_cuda(), "fused_resnet.bn_finalize: `mean` must be a CUDA tensor, got ", mean.device());
  check_same_device(mean, "mean", var, "var");
  TORCH_CHECK(mean.dim() == 1 && var.dim() == 1 && mean.numel() == var.numel(),
              "fused_resnet.bn_finalize: `mean` and `var` must be 1-D of the same length, got shapes ", mean.sizes(),
              " and ", var.sizes());
  TORCH_CHECK(count >= 0, "fused_resnet.bn_finalize: `count` must be >= 0, got ", count);
  const c10::cuda::CUDAGuard guard(mean.device());
  const int64_t C = mean.numel();
  const at::Tensor m = mean.contiguous(), v = var.contiguous();

  auto optional_param = [&](const std::optional<at::Tensor>& t, const char* name) {
    if (!t.has_value() || !t->defined()) return at::Tensor();
    check_floating(*t, name);
    check_same_device(mean, "mean", *t, name);
    TORCH_CHECK(t->numel() == C, "fused_resnet.bn_finalize: `", name, "` must hold one value per channel (", C,
                "), got shape ", t->sizes());
    return t->contiguous();
  };
  const at::Tensor w = optional_param(weight, "weight");
  const at::Tensor b = optional_param(bias, "bias");
  at::Tensor rm = optional_param(running_mean, "running_mean");
  at::Tensor rv = optional_param(running_var, "running_var");
  const bool update = rm.defined() && rv.defined();
  if (update) {
    TORCH_CHECK(rm.scalar_type() == rv.scalar_type(), "fused_resnet.bn_finalize: `running_var` has dtype ",
                rv.scalar_type(), " but `running_mean` has dtype ", rm.scalar_type(), "; expected the same dtype");
  }
  at::Tensor nbt;
  if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
    nbt = *num_batches_tracked;
    TORCH_CHECK(nbt.scalar_type() == at::kLong && nbt.numel() == 1,
                "fused_resnet.bn_finalize: `num_batches_tracked` must be a one-element int64 tensor, got ",
                nbt.scalar_type(), " of shape ", nbt.sizes());
    check_same_device(mean, "mean", nbt, "num_batches_tracked");
  }

  at::Tensor scale = at::empty({C}, m.options()), shift = at::empty({C}, m.options()),
             invstd = at::empty({C}, m.options());
  // In place on the caller's tensors; a non-contiguous one is updated through
  // a contiguous copy (made above) and copied back below.
  C10_CUDA_CHECK(bn_finalize_launch(
      sdt == at::kDouble ? DType::kFloat64 : DType::kFloat32, m.const_data_ptr(), v.const_data_ptr(), C, count,
      param_of(w, "weight"), param_of(b, "bias"), update ? rm.mutable_data_ptr() : nullptr, update ? rv.mutable_data_ptr() : nullptr,
      update ? to_kernel_dtype(rm.scalar_type(), "running_mean") : DType::kFloat32,
      nbt.defined() ? nbt.mutable_data_ptr<int64_t>() : nullptr, momentum.has_value(), momentum.value_or(0.0), eps,
      scale.mutable_data_ptr(), shift.mutable_data_ptr(), invstd.mutable_data_ptr(),
      at::cuda::getCurrentCUDAStream()));
  if (update) {
    if (!rm.is_same(*running_mean)) running_mean->copy_(rm.view_as(*running_mean));
    if (!rv.is_same(*running_var)) running_var->copy_(rv.view_as(*running_var));
  }
  return {scale, shift, invstd};
}

std::tuple<at::Tensor, at::Tensor> bn_apply_cuda(const at::Tensor& z, const at::Tensor& scale,
                                                 const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                                                 bool relu, std::optional<at::ScalarType> out_dtype) {
  // Devices first: the dispatcher sends a CPU `z` here when `scale` or `shift`
  // is on the GPU, and the mistake is then the CUDA vector, not `z`.
  check_same_device(z, "z", scale, "scale");
  check_same_device(z, "z", shift, "shift");
  check_input(z, "bn_apply", "z");
  const c10::cuda::CUDAGuard guard(z.device());
  const auto fmt = compute_format(z);
  const at::Tensor zc = z.contiguous(fmt);
  const BnShape s = shape_of(zc, fmt);
  const auto acc = stat_type(z.scalar_type());
  const at::Tensor sc = per_channel(scale, z, s.channels, acc, "bn_apply", "scale");
  const at::Tensor sh = per_channel(shift, z, s.channels, acc, "bn_apply", "shift");
  at::Tensor rc;
  if (residual.has_value() && residual->defined()) {
    check_floating(*residual, "residual");
    check_same_device(z, "z", *residual, "residual");
    check_same_shape(z, "z", *residual, "residual");
    // The reference adds residual.to(z.dtype): converting first is exact.
    rc = residual->to(z.scalar_type()).contiguous(fmt);
  }
  const auto ydt = out_dtype.value_or(z.scalar_type());
  at::Tensor y = at::empty(z.sizes(), z.options().dtype(ydt), fmt);
  const int64_t n = z.numel();
  at::Tensor mask = at::empty({relu ? (n + 7) / 8 : 0}, z.options().dtype(at::kByte));
  C10_CUDA_CHECK(bn_apply_launch(to_kernel_dtype(z.scalar_type(), "z"), to_kernel_dtype(ydt, "out_dtype"),
                                 zc.const_data_ptr(), sc.const_data_ptr(), sh.const_data_ptr(),
                                 rc.defined() ? rc.const_data_ptr() : nullptr, relu, y.mutable_data_ptr(),
                                 relu ? mask.mutable_data_ptr<uint8_t>() : nullptr, s, num_sms(),
                                 at::cuda::getCurrentCUDAStream()));
  return {y, mask};
}

// The operands every backward op shares, checked and laid out like z.
struct BackwardOperands {
  at::Tensor zc, dyc, mc, mu, is;
  BnShape s;
  at::ScalarType acc;
  at::MemoryFormat fmt;
};

BackwardOperands backward_operands(const char* op, const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mask,
                                   const at::Tensor& mean, const at::Tensor& invstd) {
  check_input(z, op, "z");
  check_floating(dy, "dy");
  check_same_device(z, "z", dy, "dy");
  check_same_shape(z, "z", dy, "dy");
  check_same_device(z, "z", mask, "mask");
  const int64_t n = z.numel();
  TORCH_CHECK(mask.scalar_type() == at::kByte, "fused_resnet.", op, ": `mask` must be uint8, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.numel() == 0 || mask.numel() == (n + 7) / 8, "fused_resnet.", op, ": `mask` must be empty (no "
              "ReLU) or hold ceil(numel(z) / 8) = ", (n + 7) / 8, " bytes, got ", mask.numel());
  BackwardOperands o;
  o.fmt = compute_format(z);
  o.zc = z.contiguous(o.fmt);
  // dy and the mask follow z's memory order.
  o.dyc = dy.contiguous(o.fmt);
  o.mc = mask.contiguous();
  o.s = shape_of(o.zc, o.fmt);
  o.acc = stat_type(z.scalar_type());
  o.mu = per_channel(mean, z, o.s.channels, o.acc, op, "mean");
  o.is = per_channel(invstd, z, o.s.channels, o.acc, op, "invstd");
  return o;
}

const uint8_t* mask_ptr(const at::Tensor& mc) { return mc.numel() > 0 ? mc.const_data_ptr<uint8_t>() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_cuda(
    const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mask, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, bool batch_stats, bool need_residual_grad) {
  const c10::cuda::CUDAGuard guard(z.device());
  const BackwardOperands o = backward_operands("bn_backward", dy, z, mask, mean, invstd);
  const BnShape& s = o.s;
  at::Tensor w;
  if (weight.has_value() && weight->defined()) w = per_channel(*weight, z, s.channels, o.acc, "bn_backward", "weight");

  at::Tensor dz = at::empty(z.sizes(), z.options(), o.fmt);
  at::Tensor dres = need_residual_grad ? at::empty(z.sizes(), dy.options(), o.fmt) : at::empty({0}, dy.options());
  if (z.numel() == 0) {
    // Sums over no elements.
    return {dz, dres, at::zeros({s.channels}, z.options().dtype(o.acc)),
            at::zeros({s.channels}, z.options().dtype(o.acc))};
  }
  at::Tensor dweight = at::empty({s.channels}, z.options().dtype(o.acc));
  at::Tensor dbias = at::empty({s.channels}, z.options().dtype(o.acc));
  at::Tensor partials = partial_buffer(s.channels, o.acc, z);
  at::Tensor coef = at::empty({3 * s.channels}, z.options().dtype(o.acc));
  C10_CUDA_CHECK(bn_backward_launch(
      to_kernel_dtype(z.scalar_type(), "z"), to_kernel_dtype(dy.scalar_type(), "dy"), o.dyc.const_data_ptr(),
      o.zc.const_data_ptr(), mask_ptr(o.mc), o.mu.const_data_ptr(), o.is.const_data_ptr(),
      w.defined() ? w.const_data_ptr() : nullptr, batch_stats, partials.mutable_data_ptr(), coef.mutable_data_ptr(),
      dz.mutable_data_ptr(), need_residual_grad ? dres.mutable_data_ptr() : nullptr, dweight.mutable_data_ptr(),
      dbias.mutable_data_ptr(), s, num_sms(), at::cuda::getCurrentCUDAStream()));
  return {dz, dres, dweight, dbias};
}

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cuda(const at::Tensor& dy, const at::Tensor& z,
                                                           const at::Tensor& mask, const at::Tensor& mean,
                                                           const at::Tensor& invstd) {
  const c10::cuda::CUDAGuard guard(z.device());
  const BackwardOperands o = backward_operands("bn_backward_reduce", dy, z, mask, mean, invstd);
  const int64_t C = o.s.channels;
  if (z.numel() == 0) return {at::zeros({C}, z.options().dtype(o.acc)), at::zeros({C}, z.options().dtype(o.acc))};
  at::Tensor sum_dy = at::empty({C}, z.options().dtype(o.acc));
  at::Tensor sum_dy_xhat = at::empty({C}, z.options().dtype(o.acc));
  at::Tensor partials = partial_buffer(C, o.acc, z);
  at::Tensor coef = at::empty({3 * C}, z.options().dtype(o.acc));
  C10_CUDA_CHECK(bn_backward_reduce_launch(
      to_kernel_dtype(z.scalar_type(), "z"), to_kernel_dtype(dy.scalar_type(), "dy"), o.dyc.const_data_ptr(),
      o.zc.const_data_ptr(), mask_ptr(o.mc), o.mu.const_data_ptr(), o.is.const_data_ptr(),
      partials.mutable_data_ptr(), coef.mutable_data_ptr(), sum_dy.mutable_data_ptr(),
      sum_dy_xhat.mutable_data_ptr(), o.s, num_sms(), at::cuda::getCurrentCUDAStream()));
  return {sum_dy, sum_dy_xhat};
}

std::tuple<at::Tensor, at::Tensor> bn_backward_elemt_cuda(const at::Tensor& dy, const at::Tensor& z,
                                                          const at::Tensor& mask, const at::Tensor& mean,
                                                          const at::Tensor& invstd,
                                                          const std::optional<at::Tensor>& weight,
                                                          const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat,
                                                          int64_t count, bool need_residual_grad) {
  const c10::cuda::CUDAGuard guard(z.device());
  const BackwardOperands o = backward_operands("bn_backward_elemt", dy, z, mask, mean, invstd);
  const int64_t C = o.s.channels;
  TORCH_CHECK(count > 0 || z.numel() == 0, "fused_resnet.bn_backward_elemt: `count` (values per channel over every "
              "process) must be positive, got ", count);
  const at::Tensor sg = per_channel(sum_dy, z, C, o.acc, "bn_backward_elemt", "sum_dy");
  const at::Tensor sx = per_channel(sum_dy_xhat, z, C, o.acc, "bn_backward_elemt", "sum_dy_xhat");
  at::Tensor k = o.is;
  if (weight.has_value() && weight->defined()) {
    k = per_channel(*weight, z, C, o.acc, "bn_backward_elemt", "weight") * o.is;
  }
  // Pass 2's coefficients [k, cb, cw] from the global sums (device-side:
  // no host synchronisation).
  const double inv_m = 1.0 / static_cast<double>(count > 0 ? count : 1);
  const at::Tensor coef = at::cat({k, sg * inv_m, sx * o.is * inv_m}).contiguous();
  at::Tensor dz = at::empty(z.sizes(), z.options(), o.fmt);
  at::Tensor dres = need_residual_grad ? at::empty(z.sizes(), dy.options(), o.fmt) : at::empty({0}, dy.options());
  if (z.numel() == 0) return {dz, dres};
  C10_CUDA_CHECK(bn_backward_elemt_launch(
      to_kernel_dtype(z.scalar_type(), "z"), to_kernel_dtype(dy.scalar_type(), "dy"), o.dyc.const_data_ptr(),
      o.zc.const_data_ptr(), mask_ptr(o.mc), o.mu.const_data_ptr(), coef.const_data_ptr(), dz.mutable_data_ptr(),
      need_residual_grad ? dres.mutable_data_ptr() : nullptr, o.s, num_sms(), at::cuda::getCurrentCUDAStream()));
  return {dz, dres};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("bn_stats", &bn_stats_cuda);
  m.impl("bn_finalize", &bn_finalize_cuda);
  m.impl("bn_apply", &bn_apply_cuda);
  m.impl("bn_backward", &bn_backward_cuda);
  m.impl("bn_backward_reduce", &bn_backward_reduce_cuda);
  m.impl("bn_backward_elemt", &bn_backward_elemt_cuda);
}

}  // namespace fused_resnet
