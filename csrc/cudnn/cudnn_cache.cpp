// Device-independent ops of the cudnn backend: the graph key, the cache's
// statistics and fallback list, and a self-test of the build-once cache. They
// run on any device (CPU and Meta tensors included), so `make test` checks the
// caching logic on machines without a GPU. Kept out of the graph files
// (graph_common.h) so they build without parsing the cuDNN frontend.
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "graph_cache.h"

namespace fused_resnet {
namespace cudnn {
namespace {

std::string key_op(c10::string_view variant, const c10::List<std::optional<at::Tensor>>& tensors,
                   at::IntArrayRef params) {
  std::vector<at::Tensor> ts;
  ts.reserve(tensors.size());
  for (const std::optional<at::Tensor>& t : tensors) ts.push_back(t.has_value() ? *t : at::Tensor());
  return graph_key(std::string(variant), ts, params.vec());
}

// [entries, hits, builds, refusals] of the process-wide cuDNN graph cache.
std::vector<int64_t> stats_op() {
  const auto s = graph_cache_stats();
  return {s.entries, s.hits, s.builds, s.refusals};
}

// "key\treason" per graph cuDNN refused, oldest first.
std::vector<std::string> fallbacks_op() {
  std::vector<std::string> out;
  for (const auto& [key, reason] : graph_cache_fallbacks()) out.push_back(key + "\t" + reason);
  return out;
}

void clear_op() { graph_cache_clear(); }

// Races `threads` threads through `rounds` lookups of each of `keys` keys in a
// private GraphCache whose builder is slow (so racers really overlap), counts
// how often the builder ran, and refuses key 0 to exercise the refusal path.
// Returns [builder_runs, hits, builds, refusals, entries, fallbacks_listed,
// wrong_values]; a correct cache gives builder_runs == keys, hits ==
// threads * rounds * keys - keys, refusals == 1 and wrong_values == 0.
std::vector<int64_t> selftest_op(int64_t threads, int64_t keys, int64_t rounds) {
  TORCH_CHECK(threads >= 1 && keys >= 1 && rounds >= 1,
              "fused_resnet.cudnn_cache_selftest: `threads`, `keys` and `rounds` must be >= 1");
  GraphCache<int64_t> cache;
  std::atomic<int64_t> builder_runs{0}, wrong{0};
  auto worker = [&](int64_t seed) {
    for (int64_t r = 0; r < rounds; ++r) {
      for (int64_t i = 0; i < keys; ++i) {
        const int64_t k = (i + seed) % keys;  // threads start on different keys
        auto v = cache.get_or_build("key" + std::to_string(k), [&]() -> std::shared_ptr<int64_t> {
          builder_runs.fetch_add(1);
          std::this_thread::sleep_for(std::chrono::milliseconds(2));
          if (k == 0) throw GraphRefused("refused on purpose");
          return std::make_shared<int64_t>(k * 10);
        });
        if (k == 0 ? v != nullptr : (v == nullptr || *v != k * 10)) wrong.fetch_add(1);
      }
    }
  };
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < threads; ++t) pool.emplace_back(worker, t);
  for (auto& th : pool) th.join();
  const auto s = cache.stats();
  return {builder_runs.load(), s.hits, s.builds, s.refusals, s.entries,
          static_cast<int64_t>(cache.fallbacks().size()), wrong.load()};
}

}  // namespace

// No tensor arguments (or only optional ones): CompositeImplicitAutograd
// kernels also serve calls that carry no dispatch key.
TORCH_LIBRARY_IMPL(fused_resnet, CompositeImplicitAutograd, m) {
  m.impl("cudnn_graph_key", &key_op);
  m.impl("cudnn_cache_stats", &stats_op);
  m.impl("cudnn_fallbacks", &fallbacks_op);
  m.impl("cudnn_cache_clear", &clear_op);
  m.impl("cudnn_cache_selftest", &selftest_op);
}

}  // namespace cudnn
}  // namespace fused_resnet
