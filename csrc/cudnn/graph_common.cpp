// The cudnn backend: conv + per-channel epilogue graphs run by cuDNN's
// runtime-fusion engines through the cuDNN frontend's graph API.
//
// This file holds what the ops share: the graph cache, the frontend helpers,
// the argument checks, and the ops' registration; each op lives in its own
// file (graph_common.h says why). Each op
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
#include "graph_common.h"  // first: it sets the optimisation level of everything below

#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include <string>

#include "../fused_resnet.h"

namespace fused_resnet {
namespace cudnn {
namespace detail {

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

TensorAttr channel_vector(fe::graph::Graph& g, const char* name, Uid uid, const at::Tensor& v) {
  const int64_t c = v.numel();
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name(name)
                      .set_uid(uid)
                      .set_dim({1, c, 1, 1})
                      .set_stride({c, 1, c, c})
                      .set_data_type(to_fe(v.scalar_type())));
}

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

TensorAttr pointwise(fe::graph::Graph& g, fe::PointwiseMode_t mode, const TensorAttr& a, const TensorAttr& b) {
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

}  // namespace detail

CacheStats graph_cache_stats() { return detail::cache().stats(); }
std::vector<std::pair<std::string, std::string>> graph_cache_fallbacks() { return detail::cache().fallbacks(); }
void graph_cache_clear() { detail::cache().clear(); }

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("cudnn_conv_bias_act", &conv_bias_act);
  m.impl("cudnn_conv_genstats", &conv_genstats);
  m.impl("cudnn_conv_dgrad", &conv_dgrad);
  m.impl("cudnn_conv_wgrad", &conv_wgrad);
}

}  // namespace cudnn
}  // namespace fused_resnet
