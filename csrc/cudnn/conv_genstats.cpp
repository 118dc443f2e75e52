// The cudnn backend's training forward op: [BN + ReLU prologue] conv + statistics.
// One op per translation unit: graph_common.h says why.
#include "graph_common.h"  // first: it sets the optimisation level of everything below

#include <c10/cuda/CUDAGuard.h>

#include <unordered_map>

#include "../fused_resnet.h"

namespace fused_resnet {
namespace cudnn {

using namespace detail;  // NOLINT: the shared helpers of every graph

// ---- training forward: z = conv(prologue(x), w), sum(z), sum(z^2) per channel -
// prologue(x) = [relu](x * in_scale + in_shift): the previous layer's BN
// (+ ReLU) applied as the conv reads its input, so the normalised activation
// is never written (MLPerf's NormConv). Without in_scale/in_shift, plain x.

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_genstats(
    const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift, bool in_relu, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  const char* op = "cudnn_conv_genstats";
  check_conv_operands(op, x_in, w_in, groups);
  const auto p = conv_params(op, stride, padding, dilation, groups);
  TORCH_CHECK(in_scale.has_value() == in_shift.has_value(), "fused_resnet.", op,
              ": `in_scale` and `in_shift` must be given together (the previous layer's BN), got only one");
  TORCH_CHECK(!in_relu || in_scale.has_value(), "fused_resnet.", op,
              ": `in_relu` needs `in_scale` and `in_shift` (a ReLU alone belongs to the previous layer)");
  check_channel_vector(op, in_scale, "in_scale", x_in.size(1), x_in);
  check_channel_vector(op, in_shift, "in_shift", x_in.size(1), x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = channels_last(x_in), w = channels_last(w_in);
  const at::Tensor sc = in_scale.has_value() ? in_scale->contiguous() : at::Tensor();
  const at::Tensor sh = in_shift.has_value() ? in_shift->contiguous() : at::Tensor();
  const auto size = out_size(x, w, p);
  at::Tensor z = at::empty(size, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor sum = at::zeros({size[1]}, x.options().dtype(at::kFloat));
  at::Tensor sqsum = at::zeros({size[1]}, x.options().dtype(at::kFloat));
  if (z.numel() == 0) return {z, sum, sqsum};

  const auto key =
      graph_key("genstats", {x, w, sc, sh, z}, concat(p.flat(), concat({in_relu}, math_flags())));
  const auto handle = current_handle();
  auto built = cache().get_or_build(key, [&] {
    auto g = new_graph(x.scalar_type());
    auto X = operand(*g, "x", kX, x);
    auto input = X;
    if (sc.defined()) {
      input = pointwise(*g, fe::PointwiseMode_t::MUL, input, channel_vector(*g, "in_scale", kInScale, sc));
      input = pointwise(*g, fe::PointwiseMode_t::ADD, input, channel_vector(*g, "in_shift", kInShift, sh));
      if (in_relu) input = pointwise(*g, fe::PointwiseMode_t::RELU_FWD, input);
    }
    auto W = operand(*g, "w", kW, w);
    auto Z = g->conv_fprop(input, W,
                           fe::graph::Conv_fprop_attributes()
                               .set_padding(p.padding)
                               .set_stride(p.stride)
                               .set_dilation(p.dilation)
                               .set_compute_data_type(fe::DataType_t::FLOAT));
    mark_output(Z, kY, z);
    auto [S, SS] = g->genstats(Z, fe::graph::Genstats_attributes().set_compute_data_type(fe::DataType_t::FLOAT));
    mark_channel_output(S, kSum, size[1]);
    mark_channel_output(SS, kSqSum, size[1]);
    return finish(g, x.scalar_type(), handle);
  });

  if (built) {
    std::unordered_map<int64_t, void*> pack = {{kX, x.data_ptr()},     {kW, w.data_ptr()},
                                               {kY, z.data_ptr()},     {kSum, sum.data_ptr()},
                                               {kSqSum, sqsum.data_ptr()}};
    if (sc.defined()) {
      pack[kInScale] = sc.data_ptr();
      pack[kInShift] = sh.data_ptr();
    }
    execute(*built, handle, pack, x);
    return {z, sum, sqsum};
  }
  at::Tensor input = x;
  if (sc.defined()) {
    at::Tensor a = x.to(at::kFloat) * per_channel(sc) + per_channel(sh);
    if (in_relu) a.relu_();
    input = a.to(x.scalar_type());
  }
  z.copy_(at::convolution(input, w, std::nullopt, p.stride, p.padding, p.dilation, false, {0, 0}, groups));
  const at::Tensor zf = z.to(at::kFloat);
  sum.copy_(zf.sum({0, 2, 3}));
  sqsum.copy_((zf * zf).sum({0, 2, 3}));
  return {z, sum, sqsum};
}

}  // namespace cudnn
}  // namespace fused_resnet
