// The bounded cache of CPU output blocks (see output_cache.h for why).
//
// A freed block goes back to a size-keyed free list unless that would take the
// cache past its limit; an allocation takes the smallest cached block that is
// at least as large and wastes at most an eighth of it. Blocks are rounded to
// whole pages, so tensors of one shape always share a size class.
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <vector>

namespace fused_resnet {
namespace {

// Below this the glibc heap serves requests without fresh mappings; the
// default allocator is as fast and the cache would only fragment.
constexpr size_t kMinCachedBytes = size_t(256) << 10;
constexpr size_t kPage = 4096;
// The limit until Python sets the configured one (fused_resnet/config.py,
// "cpu_cache_mb"), which reads FUSED_RESNET_CPU_CACHE_MB.
constexpr int64_t kDefaultLimitMiB = 256;

struct Block {
  void* ptr;
  size_t size;
};

class OutputCache final : public c10::Allocator {
 public:
  static OutputCache& instance() {
    // Never destroyed: tensors may outlive static destruction at exit.
    static OutputCache* cache = new OutputCache();
    return *cache;
  }

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes == 0) return {nullptr, nullptr, &release, c10::Device(c10::kCPU)};
    const size_t want = (nbytes + kPage - 1) / kPage * kPage;
    Block* b = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(want);
      if (it != free_.end() && it->first - want <= it->first / 8) {
        b = it->second;
        free_.erase(it);
        cached_bytes_ -= b->size;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (b == nullptr) b = new Block{c10::alloc_cpu(want), want};
    // The profiler counts the block as allocated while a tensor holds it.
    c10::profiledCPUMemoryReporter().New(b->ptr, b->size);
    return {b->ptr, b, &release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  // Returns the previous limit.
  int64_t set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "fused_resnet.set_cpu_cache_limit: `bytes` must be >= 0, got ", bytes);
    std::vector<Block*> drop;
    size_t previous;
    {
      std::lock_guard<std::mutex> lock(mu_);
      previous = limit_.exchange(static_cast<size_t>(bytes));
      // Drop the largest blocks first until the cache fits.
      while (cached_bytes_ > limit_ && !free_.empty()) {
        auto it = std::prev(free_.end());
        cached_bytes_ -= it->second->size;
        drop.push_back(it->second);
        free_.erase(it);
      }
    }
    for (Block* b : drop) destroy(b);
    return static_cast<int64_t>(previous);
  }

  void clear() {
    std::multimap<size_t, Block*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      drop.swap(free_);
      cached_bytes_ = 0;
    }
    for (auto& kv : drop) destroy(kv.second);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(limit_.load()), static_cast<int64_t>(cached_bytes_),
            static_cast<int64_t>(free_.size()), hits_, misses_, evictions_};
  }

  void reset_counters() {
    std::lock_guard<std::mutex> lock(mu_);
    hits_ = misses_ = evictions_ = 0;
  }

  // Read on every large output allocation: no lock (a racing set_limit may
  // or may not be seen by that one allocation, as with any later call).
  size_t limit() const { return limit_.load(std::memory_order_relaxed); }

 private:
  OutputCache() : limit_(static_cast<size_t>((kDefaultLimitMiB << 20))) {}

  static void destroy(Block* b) {
    c10::free_cpu(b->ptr);
    delete b;
  }

  static void release(void* ctx) {
    if (ctx == nullptr) return;
    Block* b = static_cast<Block*>(ctx);
    c10::profiledCPUMemoryReporter().Delete(b->ptr);
    instance().take_back(b);
  }

  void take_back(Block* b) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_bytes_ + b->size <= limit_) {
        // First among blocks of its size, so the next request of that size
        // gets the block freed last: the one most likely still in cache
        // (multimap::emplace would append it, handing out the coldest).
        free_.emplace_hint(free_.lower_bound(b->size), b->size, b);
        cached_bytes_ += b->size;
        return;
      }
      ++evictions_;
    }
    destroy(b);
  }

  std::mutex mu_;
  std::multimap<size_t, Block*> free_;
  size_t cached_bytes_ = 0;
  std::atomic<size_t> limit_;  // written under mu_
  int64_t hits_ = 0, misses_ = 0, evictions_ = 0;
};

std::vector<int64_t> stats_op() { return OutputCache::instance().stats(); }

int64_t set_limit_op(int64_t bytes) { return OutputCache::instance().set_limit(bytes); }

void clear_op() { OutputCache::instance().clear(); }

void reset_counters_op() { OutputCache::instance().reset_counters(); }

}  // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, at::ScalarType dtype, at::MemoryFormat fmt) {
  const size_t nbytes = static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(dtype);
  if (nbytes < kMinCachedBytes || OutputCache::instance().limit() == 0) {
    return at::empty(sizes, at::TensorOptions().dtype(dtype).device(at::kCPU).memory_format(fmt));
  }
  return at::detail::empty_generic(sizes, &OutputCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   fmt);
}

// No tensor arguments: CompositeImplicitAutograd kernels serve calls that
// carry no dispatch key.
TORCH_LIBRARY_IMPL(fused_resnet, CompositeImplicitAutograd, m) {
  m.impl("cpu_cache_stats", &stats_op);
  m.impl("cpu_cache_set_limit", &set_limit_op);
  m.impl("cpu_cache_clear", &clear_op);
  m.impl("cpu_cache_reset_counters", &reset_counters_op);
}

}  // namespace fused_resnet
