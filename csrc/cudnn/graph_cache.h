// The graph cache of the cuDNN backend, kept free of the cuDNN frontend so the
// key and the build-once logic compile (and are tested) without a GPU.
//
// A cuDNN graph with its execution plan is specific to everything that shapes
// the plan: op variant, every operand's dtype, sizes, strides (layout) and
// pointer alignment, the device, and the conv parameters. The key spells all
// of these out as text, so two calls share a plan exactly when cuDNN could not
// tell them apart.
#pragma once

#include <ATen/ATen.h>

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fused_resnet {
namespace cudnn {

// Largest power of two (at most 16 bytes) dividing t's data address: cuDNN
// engines are chosen assuming an alignment, so a misaligned view needs its
// own plan.
inline int64_t pointer_alignment(const at::Tensor& t) {
  if (!t.defined() || t.device().is_meta()) return 16;
  const auto addr = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  int64_t a = 1;
  while (a < 16 && addr % static_cast<uintptr_t>(a * 2) == 0) a *= 2;
  return a;
}

// "variant|dev|t0|t1|...|p:params". Undefined (optional) tensors are "-", so
// a graph with and without a residual never share an entry.
inline std::string graph_key(const std::string& variant, const std::vector<at::Tensor>& tensors,
                             const std::vector<int64_t>& params) {
  std::string key = variant;
  std::string device = "nodevice";
  for (const auto& t : tensors) {
    if (t.defined()) {
      device = t.device().str();
      break;
    }
  }
  key += "|" + device;
  for (const auto& t : tensors) {
    key += "|";
    if (!t.defined()) {
      key += "-";
      continue;
    }
    key += c10::toString(t.scalar_type());
    key += "[";
    for (auto s : t.sizes()) key += std::to_string(s) + ",";
    key += "]s[";
    for (auto s : t.strides()) key += std::to_string(s) + ",";
    key += "]a" + std::to_string(pointer_alignment(t));
  }
  key += "|p:";
  for (auto p : params) key += std::to_string(p) + ",";
  return key;
}

struct CacheStats {
  int64_t entries = 0;   // keys with a built graph or a recorded refusal
  int64_t hits = 0;      // lookups answered from the cache
  int64_t builds = 0;    // builder runs that produced a graph
  int64_t refusals = 0;  // builder runs that cuDNN refused (the layer falls back)
};

// Thrown by a builder when cuDNN refuses a graph (no engine for this arch,
// dtype, layout or alignment). The cache remembers the refusal, so the graph
// is not rebuilt on every call and the layer is listed as a fallback.
struct GraphRefused : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// key -> built value (a graph with its plan), or the reason it was refused.
// Each key is built at most once even when threads race for it: the first
// caller builds outside the lock while the others wait on that entry, so
// builds of different keys proceed in parallel and lookups never wait on an
// unrelated build.
template <class V>
class GraphCache {
 public:
  // The cached value for key, building it with `build` on the first call.
  // Returns nullptr (and records why) when the builder throws GraphRefused;
  // any other exception propagates and nothing is cached, so a transient
  // failure (out of memory while building) is retried next time.
  std::shared_ptr<V> get_or_build(const std::string& key, const std::function<std::shared_ptr<V>()>& build) {
    std::shared_ptr<Entry> entry;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      auto it = entries_.find(key);
      if (it == entries_.end()) {
        entry = std::make_shared<Entry>();
        entries_.emplace(key, entry);
      } else {
        entry = it->second;
        ready_.wait(lock, [&] { return entry->state != State::kBuilding; });
        if (entry->state != State::kFailed) {
          ++stats_.hits;
          return entry->value;  // nullptr for a refused graph
        }
        // A previous build failed transiently: this caller retries it.
        entry->state = State::kBuilding;
      }
    }
    std::shared_ptr<V> value;
    std::string refused;
    std::exception_ptr error;
    try {
      value = build();
    } catch (const GraphRefused& e) {
      refused = e.what();
    } catch (...) {
      error = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (error) {
        entry->state = State::kFailed;
      } else if (value) {
        entry->state = State::kReady;
        entry->value = value;
        ++stats_.builds;
      } else {
        entry->state = State::kReady;
        ++stats_.refusals;
        fallbacks_.emplace_back(key, refused.empty() ? "builder returned no graph" : refused);
      }
    }
    ready_.notify_all();
    if (error) std::rethrow_exception(error);
    return value;
  }

  CacheStats stats() const {
    std::lock_guard<std::mutex> lock(mutex_);
    CacheStats s = stats_;
    s.entries = static_cast<int64_t>(entries_.size());
    return s;
  }

  // (key, reason) for every graph cuDNN refused, in the order they happened.
  std::vector<std::pair<std::string, std::string>> fallbacks() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return fallbacks_;
  }

  // Drops every entry not being built right now, and the statistics.
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end();) {
      it = it->second->state == State::kBuilding ? std::next(it) : entries_.erase(it);
    }
    stats_ = CacheStats{};
    fallbacks_.clear();
  }

 private:
  enum class State { kBuilding, kReady, kFailed };
  struct Entry {
    State state = State::kBuilding;
    std::shared_ptr<V> value;
  };

  mutable std::mutex mutex_;
  std::condition_variable ready_;
  std::unordered_map<std::string, std::shared_ptr<Entry>> entries_;
  CacheStats stats_;
  std::vector<std::pair<std::string, std::string>> fallbacks_;
};

// The process-wide statistics and fallback list of the cuDNN graphs,
// defined next to the cache in graph_common.cpp.
CacheStats graph_cache_stats();
std::vector<std::pair<std::string, std::string>> graph_cache_fallbacks();
void graph_cache_clear();

}  // namespace cudnn
}  // namespace fused_resnet
