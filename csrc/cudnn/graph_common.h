// The cudnn backend's shared pieces: the frontend-facing helpers every graph
// uses (operands, pointwise nodes, execution) and the argument checks,
// declared here and defined in graph_common.cpp; the plan building
// (graph_plan.cpp); the four ops, each defined in its own translation unit
// (conv_bias_act.cpp, conv_genstats.cpp, conv_dgrad.cpp, conv_wgrad.cpp) and
// registered in graph_common.cpp.
//
// One translation unit per op, because the frontend is header-only and heavy:
// the single file that held everything took 74 s to compile (25 s of it the
// headers), twice any other file of the extension, so it alone set the
// length of a parallel build. Split, each file compiles in about the time of
// the other large ones.
#pragma once

// Host code that builds a graph once per shape and runs it: -O1 is plenty,
// and at -O3 the frontend's header-only templates made each of these files
// take about half again as long to compile (graph_plan.cpp: 55 s -> 39 s on
// one core of the 2-core CI machine). Before any include, so the
// frontend's and torch's inline functions instantiated here get it too;
// graph_common.h is the first include of every file that includes it.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("O1")
#endif

#include <ATen/ATen.h>
#include <ATen/cudnn/Handle.h>

// The frontend's JSON (de)serialisation is unused here and costs ~25% of the
// frontend's compile time.
#define CUDNN_FRONTEND_SKIP_JSON_LIB
#include <cudnn_frontend.h>

#include <memory>
#include <optional>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "graph_cache.h"

namespace fused_resnet {
namespace cudnn {

// ---- the ops (one translation unit each) -------------------------------------

at::Tensor conv_bias_act(const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual_in, bool relu, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_genstats(
    const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift, bool in_relu, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups);
at::Tensor conv_dgrad(const at::Tensor& dy_in, const at::Tensor& w_in, at::IntArrayRef x_size,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
at::Tensor conv_wgrad(const at::Tensor& dy_in, const at::Tensor& x_in, at::IntArrayRef w_size,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

namespace detail {

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

// The process-wide cache of built graphs, shared by every op.
GraphCache<Built>& cache();

fe::DataType_t to_fe(at::ScalarType t);
// Throws GraphRefused with the step's name when cuDNN reports an error.
void ok(fe::error_t status, const char* step);
TensorAttr operand(fe::graph::Graph& g, const char* name, Uid uid, const at::Tensor& t);
// A per-channel vector of C values, broadcast over N, H, W.
TensorAttr channel_vector(fe::graph::Graph& g, const char* name, Uid uid, const at::Tensor& v);
// The per-channel statistics: fp32 vectors of C values, laid out {1, C, 1, 1}.
void mark_channel_output(const TensorAttr& t, Uid uid, int64_t c);
void mark_output(const TensorAttr& t, Uid uid, const at::Tensor& like);
TensorAttr pointwise(fe::graph::Graph& g, fe::PointwiseMode_t mode, const TensorAttr& a,
                     const TensorAttr& b = nullptr);
std::shared_ptr<fe::graph::Graph> new_graph(at::ScalarType io);
// Operation graph -> execution plan (graph_plan.cpp).
std::shared_ptr<Built> finish(std::shared_ptr<fe::graph::Graph> g, at::ScalarType io, cudnnHandle_t handle);
cudnnHandle_t current_handle();
void execute(const Built& b, cudnnHandle_t handle, std::unordered_map<int64_t, void*>& pack,
             const at::Tensor& like);

// ---- argument checks shared by the ops ---------------------------------------

struct ConvParams {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
  std::vector<int64_t> flat() const {
    return {stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], groups};
  }
};

ConvParams conv_params(const char* op, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t groups);
void check_conv_operands(const char* op, const at::Tensor& x, const at::Tensor& weight, int64_t groups);
void check_channel_vector(const char* op, const std::optional<at::Tensor>& v, const char* name, int64_t c,
                          const at::Tensor& x);
std::vector<int64_t> out_size(const at::Tensor& x, const at::Tensor& w, const ConvParams& p);

inline at::Tensor channels_last(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

inline std::vector<int64_t> math_flags() {
  return {at::globalContext().allowTF32CuDNN() ? 1 : 0, at::globalContext().deterministicAlgorithms() ? 1 : 0};
}

inline std::vector<int64_t> concat(std::vector<int64_t> a, const std::vector<int64_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

inline at::Tensor per_channel(const at::Tensor& v) { return v.to(at::kFloat).view({1, -1, 1, 1}); }

}  // namespace detail
}  // namespace cudnn
}  // namespace fused_resnet
