// The cudnn backend's inference op: conv + bias [+ residual] [+ ReLU].
// One op per translation unit: graph_common.h says why.
#include "graph_common.h"  // first: it sets the optimisation level of everything below

#include <c10/cuda/CUDAGuard.h>

#include <unordered_map>

#include "../fused_resnet.h"

namespace fused_resnet {
namespace cudnn {

using namespace detail;  // NOLINT: the shared helpers of every graph

// ---- inference: y = [relu](conv(x, w) [+ bias] [+ residual]) ----------------

at::Tensor conv_bias_act(const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual_in, bool relu, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "cudnn_conv_bias_act";
  check_conv_operands(op, x_in, w_in, groups);
  const auto p = conv_params(op, stride, padding, dilation, groups);
  check_channel_vector(op, bias, "bias", w_in.size(0), x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = channels_last(x_in), w = channels_last(w_in);
  const auto size = out_size(x, w, p);
  at::Tensor residual;
  if (residual_in.has_value()) {
    check_same_device(x_in, "x", *residual_in, "residual");
    TORCH_CHECK(residual_in->sizes() == at::IntArrayRef(size), "fused_resnet.", op, ": `residual` has shape ",
                residual_in->sizes(), " but the convolution output has shape ", at::IntArrayRef(size));
    TORCH_CHECK(residual_in->scalar_type() == x.scalar_type(), "fused_resnet.", op, ": `residual` has dtype ",
                residual_in->scalar_type(), " but `x` has dtype ", x.scalar_type(), "; expected the same dtype");
    residual = channels_last(*residual_in);
  }
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty(size, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;

  const auto key = graph_key("bias_act", {x, w, b, residual, y}, concat(p.flat(), concat({relu}, math_flags())));
  const auto handle = current_handle();
  auto built = cache().get_or_build(key, [&] {
    auto g = new_graph(x.scalar_type());
    auto X = operand(*g, "x", kX, x);
    auto W = operand(*g, "w", kW, w);
    auto out = g->conv_fprop(X, W,
                             fe::graph::Conv_fprop_attributes()
                                 .set_padding(p.padding)
                                 .set_stride(p.stride)
                                 .set_dilation(p.dilation)
                                 .set_compute_data_type(fe::DataType_t::FLOAT));
    if (b.defined()) out = pointwise(*g, fe::PointwiseMode_t::ADD, out, channel_vector(*g, "bias", kBias, b));
    if (residual.defined()) {
      out = pointwise(*g, fe::PointwiseMode_t::ADD, out, operand(*g, "residual", kResidual, residual));
    }
    if (relu) out = pointwise(*g, fe::PointwiseMode_t::RELU_FWD, out);
    mark_output(out, kY, y);
    return finish(g, x.scalar_type(), handle);
  });

  if (built) {
    std::unordered_map<int64_t, void*> pack = {{kX, x.data_ptr()}, {kW, w.data_ptr()}, {kY, y.data_ptr()}};
    if (b.defined()) pack[kBias] = b.data_ptr();
    if (residual.defined()) pack[kResidual] = residual.data_ptr();
    execute(*built, handle, pack, x);
    return y;
  }
  // Refused: aten's convolution, then the epilogue in fp32.
  at::Tensor acc = at::convolution(x, w, std::nullopt, p.stride, p.padding, p.dilation, false, {0, 0}, groups).to(at::kFloat);
  if (b.defined()) acc.add_(per_channel(b));
  if (residual.defined()) acc.add_(residual);
  if (relu) acc.relu_();
  y.copy_(acc);
  return y;
}

}  // namespace cudnn
}  // namespace fused_resnet
