// The cudnn backend's data gradient op.
// One op per translation unit: graph_common.h says why.
#include "graph_common.h"  // first: it sets the optimisation level of everything below

#include <c10/cuda/CUDAGuard.h>

#include <unordered_map>

#include "../fused_resnet.h"

namespace fused_resnet {
namespace cudnn {

using namespace detail;  // NOLINT: the shared helpers of every graph

// ---- backward, data gradient: dx = dgrad(dy, w) ------------------------------

at::Tensor conv_dgrad(const at::Tensor& dy_in, const at::Tensor& w_in, at::IntArrayRef x_size,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "cudnn_conv_dgrad";
  TORCH_CHECK(x_size.size() == 4, "fused_resnet.", op, ": `x_size` must have 4 values, got ", x_size);
  const auto p = conv_params(op, stride, padding, dilation, groups);
  at::Tensor dx = at::empty(x_size, dy_in.options().memory_format(at::MemoryFormat::ChannelsLast));
  check_conv_operands(op, dx, w_in, groups);
  TORCH_CHECK(dy_in.scalar_type() == dx.scalar_type() && dy_in.dim() == 4, "fused_resnet.", op,
              ": `dy` must be 4-D with weight's dtype, got ", dy_in.sizes(), " ", dy_in.scalar_type());
  TORCH_CHECK(dy_in.sizes() == at::IntArrayRef(out_size(dx, w_in, p)), "fused_resnet.", op, ": `dy` has shape ",
              dy_in.sizes(), " but the convolution output has shape ", at::IntArrayRef(out_size(dx, w_in, p)));
  const c10::cuda::CUDAGuard guard(dy_in.device());
  const at::Tensor dy = channels_last(dy_in), w = channels_last(w_in);
  if (dx.numel() == 0) return dx;

  const auto key = graph_key("dgrad", {dy, w, dx}, concat(p.flat(), math_flags()));
  const auto handle = current_handle();
  auto built = cache().get_or_build(key, [&] {
    auto g = new_graph(dy.scalar_type());
    auto DY = operand(*g, "dy", kDy, dy);
    auto W = operand(*g, "w", kW, w);
    auto DX = g->conv_dgrad(DY, W,
                            fe::graph::Conv_dgrad_attributes()
                                .set_padding(p.padding)
                                .set_stride(p.stride)
                                .set_dilation(p.dilation)
                                .set_compute_data_type(fe::DataType_t::FLOAT));
    mark_output(DX, kDx, dx);
    return finish(g, dy.scalar_type(), handle);
  });
  if (built) {
    std::unordered_map<int64_t, void*> pack = {{kDy, dy.data_ptr()}, {kW, w.data_ptr()}, {kDx, dx.data_ptr()}};
    execute(*built, handle, pack, dy);
    return dx;
  }
  auto grads = at::convolution_backward(dy, dx, w, std::nullopt, p.stride, p.padding, p.dilation, false, {0, 0},
                                        groups, {true, false, false});
  dx.copy_(std::get<0>(grads));
  return dx;
}

}  // namespace cudnn
}  // namespace fused_resnet
