#include "output_buffers.h"

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace adapterfast::cpu {
namespace {

// The buffer's size is stored in a header in front of the data (64 bytes, so the data keeps the
// 64-byte alignment of c10::alloc_cpu).
constexpr size_t kHeader = 64;
constexpr size_t kPage = 4096;

bool env_enabled(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr || std::string(value) != "0";
}

// ADAPTERFAST_CPU_HUGE_PAGES=0 turns the advice off (for systems where THP compaction stalls).
bool huge_pages_enabled() {
  static const bool enabled = env_enabled("ADAPTERFAST_CPU_HUGE_PAGES");
  return enabled;
}

// Asks for transparent huge pages on the 2 MiB-aligned interior of [data, data + bytes) when it
// spans at least two of them: 2 MiB pages make a fresh buffer's first-touch faults ~6x cheaper.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!huge_pages_enabled()) return;
  constexpr uintptr_t kHugePage = uintptr_t(1) << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHugePage - 1);
  if (end >= begin + 2 * kHugePage) {
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#else
  (void)data;
  (void)bytes;
#endif
}

class Cache {
 public:
  // A buffer of at least `bytes` (its capacity in the header): the most recently released one of
  // that capacity, else a new one.
  void* take(size_t bytes) {
    const size_t capacity = (bytes + kPage - 1) / kPage * kPage;
    if (enabled_ && capacity >= kMinCachedBytes) {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = free_.size(); i-- > 0;) {
        if (free_[i].first == capacity) {
          char* base = static_cast<char*>(free_[i].second);
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
          cached_ -= capacity;
          return base + kHeader;
        }
      }
    }
    char* base = static_cast<char*>(c10::alloc_cpu(capacity + kHeader));
    std::memcpy(base, &capacity, sizeof(capacity));
    advise_huge_pages(base + kHeader, capacity);
    return base + kHeader;
  }

  // Keeps the buffer (dropping the oldest ones past kMaxCachedBytes) or frees it.
  void release(void* data) {
    char* base = static_cast<char*>(data) - kHeader;
    size_t capacity = 0;
    std::memcpy(&capacity, base, sizeof(capacity));
    if (!enabled_ || capacity < kMinCachedBytes || capacity > kMaxCachedBytes) {
      c10::free_cpu(base);
      return;
    }
    std::vector<void*> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      size_t drop = 0;
      while (drop < free_.size() && cached_ + capacity > kMaxCachedBytes) cached_ -= free_[drop++].first;
      for (size_t i = 0; i < drop; ++i) dropped.push_back(free_[i].second);
      free_.erase(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(drop));
      free_.emplace_back(capacity, base);
      cached_ += capacity;
    }
    for (void* p : dropped) c10::free_cpu(p);
  }

  size_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

 private:
  const bool enabled_ = env_enabled("ADAPTERFAST_CPU_OUTPUT_CACHE");
  std::mutex mutex_;
  std::vector<std::pair<size_t, void*>> free_;  // (capacity, base), oldest first
  size_t cached_ = 0;
};

Cache& cache() {
  static Cache* instance = new Cache();
  return *instance;
}

void release(void* data) {
  c10::profiledCPUMemoryReporter().Delete(data);
  cache().release(data);
}

class OutputAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes == 0) return {nullptr, nullptr, &release, c10::Device(c10::DeviceType::CPU)};
    void* data = cache().take(bytes);
    c10::profiledCPUMemoryReporter().New(data, bytes);
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

c10::Allocator* output_allocator() {
  static OutputAllocator* instance = new OutputAllocator();
  return instance;
}

size_t cached_output_bytes() { return cache().cached(); }

}  // namespace adapterfast::cpu
