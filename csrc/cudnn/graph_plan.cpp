// The cudnn backend's plan building: an operation graph validated and
// lowered, its execution plan chosen and built. In a file of its own because
// it instantiates most of the frontend (graph_common.h says why that matters).
#include "graph_common.h"  // first: it sets the optimisation level of everything below

#include <string>

namespace fused_resnet {
namespace cudnn {
namespace detail {

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

}  // namespace detail
}  // namespace cudnn
}  // namespace fused_resnet
