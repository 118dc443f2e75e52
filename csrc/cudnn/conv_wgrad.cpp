// The cudnn backend's weight gradient op.
// One op per translation unit: graph_common.h says why.
#include "graph_common.h"  // first: it sets the optimisation level of everything below

#include <c10/cuda/CUDAGuard.h>

#include <unordered_map>

#include "../fused_resnet.h"

namespace fused_resnet {
namespace cudnn {

using namespace detail;  // NOLINT: the shared helpers of every graph

at::Tensor conv_wgrad(const at::Tensor& dy_in, const at::Tensor& x_in, at::IntArrayRef w_size,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "cudnn_conv_wgrad";
  TORCH_CHECK(w_size.size() == 4, "fused_resnet.", op, ": `weight_size` must have 4 values, got ", w_size);
  const auto p = conv_params(op, stride, padding, dilation, groups);
  // dw is written in x's dtype (accumulated in fp32 inside), as aten's cuDNN
  // wgrad does.
  at::Tensor dw = at::empty(w_size, x_in.options().memory_format(at::MemoryFormat::ChannelsLast));
  check_conv_operands(op, x_in, dw, groups);
  TORCH_CHECK(dy_in.scalar_type() == x_in.scalar_type() && dy_in.dim() == 4, "fused_resnet.", op,
              ": `dy` must be 4-D with x's dtype, got ", dy_in.sizes(), " ", dy_in.scalar_type());
  TORCH_CHECK(dy_in.sizes() == at::IntArrayRef(out_size(x_in, dw, p)), "fused_resnet.", op, ": `dy` has shape ",
              dy_in.sizes(), " but the convolution output has shape ", at::IntArrayRef(out_size(x_in, dw, p)));
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor dy = channels_last(dy_in), x = channels_last(x_in);
  if (dw.numel() == 0) return dw;
  if (dy.numel() == 0) return dw.zero_();

  const auto key = graph_key("wgrad", {dy, x, dw}, concat(p.flat(), math_flags()));
  const auto handle = current_handle();
  auto built = cache().get_or_build(key, [&] {
    auto g = new_graph(x.scalar_type());
    auto DY = operand(*g, "dy", kDy, dy);
    auto X = operand(*g, "x", kX, x);
    auto DW = g->conv_wgrad(DY, X,
                            fe::graph::Conv_wgrad_attributes()
                                .set_padding(p.padding)
                                .set_stride(p.stride)
                                .set_dilation(p.dilation)
                                .set_compute_data_type(fe::DataType_t::FLOAT));
    mark_output(DW, kDw, dw);
    return finish(g, x.scalar_type(), handle);
  });
  if (built) {
    std::unordered_map<int64_t, void*> pack = {{kDy, dy.data_ptr()}, {kX, x.data_ptr()}, {kDw, dw.data_ptr()}};
    execute(*built, handle, pack, x);
    return dw;
  }
  auto grads = at::convolution_backward(dy, x, dw, std::nullopt, p.stride, p.padding, p.dilation, false, {0, 0},
                                        groups, {false, true, false});
  dw.copy_(std::get<1>(grads));
  return dw;
}

}  // namespace cudnn
}  // namespace fused_resnet
