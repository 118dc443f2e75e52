// CPU fused_resnet::bn_finalize: scale/shift/invstd from batch statistics and
// nn.BatchNorm's running-statistic update, with F.batch_norm's rules:
//   num_batches_tracked += 1 (when given);
//   factor = momentum, or 1 / num_batches_tracked when momentum is None
//            (0 when there is no counter, as nn.BatchNorm would have);
//   running_mean = (1 - factor) * running_mean + factor * mean;
//   running_var  = (1 - factor) * running_var + factor * var * count / (count - 1).
// C values per call: a scalar loop in the statistics' precision.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

#include "bn_common.h"

namespace fused_resnet {
namespace bn {
namespace {

void check_running(const c10::optional<at::Tensor>& t, const char* name, int64_t C) {
  if (!t.has_value()) return;
  check_channel_vec(*t, "bn_finalize", name, C);
  TORCH_CHECK(t->is_contiguous(), "fused_resnet.bn_finalize: `", name, "` must be contiguous (it is updated in place)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_finalize_cpu(
    const at::Tensor& mean, const at::Tensor& var, int64_t count, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& num_batches_tracked,
    c10::optional<double> momentum, double eps) {
  check_cpu(mean, "bn_finalize", "mean");
  TORCH_CHECK(mean.dim() == 1, "fused_resnet.bn_finalize: `mean` must be 1-D (one value per channel), got shape ",
              mean.sizes());
  const int64_t C = mean.size(0);
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble,
              "fused_resnet.bn_finalize: `mean` must be float32 or float64 (statistics precision), got ",
              mean.scalar_type());
  check_channel_vec(var, "bn_finalize", "var", C);
  TORCH_CHECK(var.scalar_type() == mean.scalar_type(), "fused_resnet.bn_finalize: `var` has dtype ",
              var.scalar_type(), " but `mean` has dtype ", mean.scalar_type(), "; expected the same dtype");
  if (weight.has_value()) check_channel_vec(*weight, "bn_finalize", "weight", C);
  if (bias.has_value()) check_channel_vec(*bias, "bn_finalize", "bias", C);
  check_running(running_mean, "running_mean", C);
  check_running(running_var, "running_var", C);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "fused_resnet.bn_finalize: `running_mean` and `running_var` must be given together");
  if (num_batches_tracked.has_value()) {
    check_cpu(*num_batches_tracked, "bn_finalize", "num_batches_tracked");
    TORCH_CHECK(num_batches_tracked->numel() == 1,
                "fused_resnet.bn_finalize: `num_batches_tracked` must hold one value, got shape ",
                num_batches_tracked->sizes());
  }
  TORCH_CHECK(count >= 0, "fused_resnet.bn_finalize: `count` must be >= 0, got ", count);
  TORCH_CHECK(eps >= 0, "fused_resnet.bn_finalize: `eps` must be >= 0, got ", eps);

  const auto st = mean.scalar_type();
  const at::Tensor m = mean.contiguous();
  const at::Tensor v = var.contiguous();
  // Parameters in the statistics' precision (a copy only for fp16/bf16 params).
  const at::Tensor w = weight.has_value() ? weight->to(st).contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->to(st).contiguous() : at::Tensor();
  at::Tensor scale = at::empty({C}, mean.options());
  at::Tensor shift = at::empty({C}, mean.options());
  at::Tensor invstd = at::empty({C}, mean.options());

  if (num_batches_tracked.has_value()) num_batches_tracked->add_(1);
  const bool update = running_mean.has_value();
  double factor = 0.0;
  if (update) {
    if (momentum.has_value()) {
      factor = *momentum;
    } else if (num_batches_tracked.has_value()) {
      factor = 1.0 / num_batches_tracked->item<double>();
    }
  }
  const double unbias = count > 1 ? static_cast<double>(count) / static_cast<double>(count - 1) : 1.0;
  // Running stats keep their own dtype (fp16 for a .half() module): update a
  // statistics-precision copy when they differ, then write it back.
  at::Tensor rm, rv;
  if (update) {
    rm = running_mean->scalar_type() == st ? *running_mean : running_mean->to(st);
    rv = running_var->scalar_type() == st ? *running_var : running_var->to(st);
  }

  AT_DISPATCH_FLOATING_TYPES(st, "bn_finalize_cpu", [&] {
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* sp = scale.mutable_data_ptr<scalar_t>();
    scalar_t* tp = shift.mutable_data_ptr<scalar_t>();
    scalar_t* ip = invstd.mutable_data_ptr<scalar_t>();
    scalar_t* rmp = update ? rm.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* rvp = update ? rv.mutable_data_ptr<scalar_t>() : nullptr;
    const scalar_t f = static_cast<scalar_t>(factor);
    const scalar_t keep = static_cast<scalar_t>(1.0 - factor);
    const scalar_t ub = static_cast<scalar_t>(unbias);
    const scalar_t e = static_cast<scalar_t>(eps);
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t is = scalar_t(1) / std::sqrt(vp[c] + e);
      const scalar_t s = wp ? wp[c] * is : is;
      ip[c] = is;
      sp[c] = s;
      tp[c] = (bp ? bp[c] : scalar_t(0)) - mp[c] * s;
      if (update) {
        rmp[c] = rmp[c] * keep + f * mp[c];
        rvp[c] = rvp[c] * keep + f * (vp[c] * ub);
      }
    }
  });
  if (update) {
    if (!rm.is_same(*running_mean)) running_mean->copy_(rm);
    if (!rv.is_same(*running_var)) running_var->copy_(rv);
  }
  return {scale, shift, invstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("bn_finalize", &bn_finalize_cpu);
}

}  // namespace bn
}  // namespace fused_resnet
