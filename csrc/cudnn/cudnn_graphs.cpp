// The cudnn backend: conv + per-channel epilogue graphs run by cuDNN's
// runtime-fusion engines through the cuDNN frontend's graph API.
//
// The only translation unit that includes the (header-only, heavy) frontend:
// every graph lives here. Each op
//   1. normalises its operands to channels_last (the layout cuDNN's fusion
//      engines run; NCHW inputs are copied once),
//   2. looks its graph up in a GraphCache keyed by graph_key(): variant,
//      every operand's dtype/sizes/strides/alignment, device, conv parameters
//      and the math flags (TF32, determinism); the first call builds the
//      graph and picks its execution plan (heuristics mode A, then FALLBACK),
//   3. runs it with torch's cuDNN handle on the current stream, the workspace
//      coming from the caching allocator.
// When cuDNN refuses a graph (no engine for this arch/dtype/alignment) the
// refusal is cached and listed by cudnn_fallbacks(), and the op computes the
// same result with aten's convolution and an fp32 epilogue, so a refused
// layer is slower, never wrong.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cudnn/Handle.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

// The frontend's JSON (de)serialisation is unused here and costs ~25% of this
// file's compile time.
#define CUDNN_FRONTEND_SKIP_JSON_LIB
#include <cudnn_frontend.h>

#include <array>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "../fused_resnet.h"
#include "graph_cache.h"

namespace fused_resnet {
namespace cudnn {
namespace {

namespace fe = cudnn_frontend;
using TensorAttr = std::shared_ptr<fe::graph::Tensor_attributes>;

// Fixed tensor uids: the variant pack is built from these, so a cached graph
// needs no per-call bookkeeping of which attribute is which.
enum Uid : int64_t {
  kX = 1, kW, kBias, kResidual, kY, kSum, kSqSum, kInScale, kInShift, kDy, kDx, kDw,
};

struct Built {
  std::shared_ptr<fe::graph::Graph> graph;
  int64_t workspace = 0;
};

GraphCache<Built>& cache() {
  static GraphCache<Built> instance;
  return instance;
}

fe::DataType_t to_fe(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return fe::DataType_t::HALF;
    case at::kBFloat16: return fe::DataType_t::BFLOAT16;
    case at::kFloat: return fe::DataType_t::FLOAT;
    case at::kDouble: return fe::DataType_t::DOUBLE;
    default: TORCH_CHECK(false, "fused_resnet.cudnn: unsupported dtype ", t);
  }
}

void ok(fe::error_t status, const char* step) {
  if (status.is_bad()) throw GraphRefused(std::string(step) + ": " + status.get_message());
}

TensorAttr operand(fe::graph::Graph& g, const char* name, Uid uid, const at::Tensor& t) {
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name(name)
                      .set_uid(uid)
                      .set_dim(t.sizes().vec())
                      .set_stride(t.strides().vec())
                      .set_data_type(to_fe(t.scalar_type())));
}

// A per-channel vector of C values, broadcast over N, H, W.
TensorAttr channel_vector(fe::graph::Graph& g, const char* name, Uid uid, const at::Tensor& v) {
  const int64_t c = v.numel();
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name(name)
                      .set_uid(uid)
                      .set_dim({1, c, 1, 1})
                      .set_stride({c, 1, c, c})
                      .set_data_type(to_fe(v.scalar_type())));
}

// The per-channel statistics: fp32 vectors of C values, laid out {1, C, 1, 1}.
void mark_channel_output(const TensorAttr& t, Uid uid, int64_t c) {
  t->set_output(true).set_uid(uid).set_dim({1, c, 1, 1}).set_stride({c, 1, c, c}).set_data_type(
      fe::DataType_t::FLOAT);
}

void mark_output(const TensorAttr& t, Uid uid, const at::Tensor& like) {
  t->set_output(true)
      .set_uid(uid)
      .set_dim(like.sizes().vec())
      .set_stride(like.strides().vec())
      .set_data_type(to_fe(like.scalar_type()));
}

TensorAttr pointwise(fe::graph::Graph& g, fe::PointwiseMode_t mode, const TensorAttr& a,
                     const TensorAttr& b = nullptr) {
  auto attrs = fe::graph::Pointwise_attributes().set_mode(mode).set_compute_data_type(fe::DataType_t::FLOAT);
  return b ? g.pointwise(a, b, attrs) : g.pointwise(a, attrs);
}

std::shared_ptr<fe::graph::Graph> new_graph(at::ScalarType io) {
  auto g = std::make_shared<fe::graph::Graph>();
  g->set_io_data_type(to_fe(io))
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  return g;
}

// Operation graph -> execution plan, chosen once per key. fp32 convolutions
// may use TF32 tensor cores only where torch's own flag allows it, and
// deterministic mode excludes nondeterministic engines, as aten's cuDNN
// convolutions do.
std::shared_ptr<Built> finish(std::shared_ptr<fe::graph::Graph> g, at::ScalarType io, cudnnHandle_t handle) {
  ok(g->validate(), "validate");
  ok(g->build_operation_graph(handle), "build_operation_graph");
  ok(g->create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK}), "create_execution_plans");
  if (io == at::kFloat && !at::globalContext().allowTF32CuDNN()) {
    g->deselect_numeric_notes({fe::NumericalNote_t::TENSOR_CORE});
  }
  if (at::globalContext().deterministicAlgorithms()) {
    g->deselect_numeric_notes({fe::NumericalNote_t::NONDETERMINISTIC});
  }
  ok(g->check_support(handle), "check_support");
  ok(g->build_plans(handle, fe::BuildPlanPolicy_t::HEURISTICS_CHOICE), "build_plans");
  auto built = std::make_shared<Built>();
  built->workspace = g->get_workspace_size();
  built->graph = std::move(g);
  return built;
}

cudnnHandle_t current_handle() {
  cudnnHandle_t handle = at::native::getCudnnHandle();
  TORCH_CHECK(cudnnSetStream(handle, at::cuda::getCurrentCUDAStream()) == CUDNN_STATUS_SUCCESS,
              "fused_resnet.cudnn: cudnnSetStream failed");
  return handle;
}

void execute(const Built& b, cudnnHandle_t handle, std::unordered_map<int64_t, void*>& pack,
             const at::Tensor& like) {
  at::Tensor workspace;
  if (b.workspace > 0) workspace = at::empty({b.workspace}, like.options().dtype(at::kByte));
  auto status = b.graph->execute(handle, pack, b.workspace > 0 ? workspace.data_ptr() : nullptr);
  TORCH_CHECK(status.is_good(), "fused_resnet.cudnn: executing a built graph failed: ", status.get_message());
}

// ---- argument checks shared by the ops -------------------------------------

struct ConvParams {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
  std::vector<int64_t> flat() const {
    return {stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], groups};
  }
};

ConvParams conv_params(const char* op, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t groups) {
  auto pair = [&](at::IntArrayRef v, const char* name, int64_t min) {
    TORCH_CHECK(v.size() == 2, "fused_resnet.", op, ": `", name, "` must have 2 values, got ", v.size());
    TORCH_CHECK(v[0] >= min && v[1] >= min, "fused_resnet.", op, ": `", name, "` must be >= ", min, ", got ", v);
    return v.vec();
  };
  TORCH_CHECK(groups >= 1, "fused_resnet.", op, ": `groups` must be >= 1, got ", groups);
  return {pair(stride, "stride", 1), pair(padding, "padding", 0), pair(dilation, "dilation", 1), groups};
}

void check_conv_operands(const char* op, const at::Tensor& x, const at::Tensor& weight, int64_t groups) {
  TORCH_CHECK(x.is_cuda(), "fused_resnet.", op, ": `x` must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "fused_resnet.", op, ": `x` must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4, "fused_resnet.", op, ": `weight` must be 4-D (K, C/groups, R, S), got ",
              weight.dim(), "-D");
  check_same_device(x, "x", weight, "weight");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, "fused_resnet.", op,
              ": `x` must be float16, bfloat16 or float32, got ", dt);
  TORCH_CHECK(weight.scalar_type() == dt, "fused_resnet.", op, ": `weight` has dtype ", weight.scalar_type(),
              " but `x` has dtype ", dt, "; expected the same dtype");
  TORCH_CHECK(x.size(1) == weight.size(1) * groups && weight.size(0) % groups == 0, "fused_resnet.", op,
              ": `weight` of shape ", weight.sizes(), " does not fit `x` of shape ", x.sizes(), " with groups=",
              groups);
}

void check_channel_vector(const char* op, const std::optional<at::Tensor>& v, const char* name, int64_t c,
                          const at::Tensor& x) {
  if (!v.has_value()) return;
  TORCH_CHECK(v->numel() == c && v->dim() == 1, "fused_resnet.", op, ": `", name, "` must have shape (", c,
              "), got ", v->sizes());
  check_same_device(x, "x", *v, name);
  const auto dt = v->scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == x.scalar_type(), "fused_resnet.", op, ": `", name,
              "` must be float32 or x's dtype, got ", dt);
}

std::vector<int64_t> out_size(const at::Tensor& x, const at::Tensor& w, const ConvParams& p) {
  std::vector<int64_t> s = {x.size(0), w.size(0), 0, 0};
  for (int d = 0; d < 2; ++d) {
    s[d + 2] = (x.size(d + 2) + 2 * p.padding[d] - p.dilation[d] * (w.size(d + 2) - 1) - 1) / p.stride[d] + 1;
    TORCH_CHECK(s[d + 2] > 0, "fused_resnet.cudnn: the convolution output would be empty for `x` of shape ",
                x.sizes(), " and `weight` of shape ", w.sizes());
  }
  return s;
}

at::Tensor channels_last(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

std::vector<int64_t> math_flags() {
  return {at::globalContext().allowTF32CuDNN() ? 1 : 0, at::globalContext().deterministicAlgorithms() ? 1 : 0};
}

std::vector<int64_t> concat(std::vector<int64_t> a, const std::vector<int64_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

at::Tensor per_channel(const at::Tensor& v) { return v.to(at::kFloat).view({1, -1, 1, 1}); }

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

// ---- backward: dx = dgrad(dy, w), dw = wgrad(dy, x) ---------------------------

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

}  // namespace

CacheStats graph_cache_stats() { return cache().stats(); }
std::vector<std::pair<std::string, std::string>> graph_cache_fallbacks() { return cache().fallbacks(); }
void graph_cache_clear() { cache().clear(); }

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("cudnn_conv_bias_act", &conv_bias_act);
  m.impl("cudnn_conv_genstats", &conv_genstats);
  m.impl("cudnn_conv_dgrad", &conv_dgrad);
  m.impl("cudnn_conv_wgrad", &conv_wgrad);
}

}  // namespace cudnn
}  // namespace fused_resnet
