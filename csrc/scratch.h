// Scratch: an owned buffer of n values of a trivially copyable T, left uninitialised or zeroed
// with one memset. For the 16-bit drivers' per-call buffers instead of std::vector<T>(n):
// c10::BFloat16 and c10::Half are class types, so the vector value-initialises them one 16-bit
// store at a time, reloading the value after every store. With std::vector, the buffers of one
// bf16 backward call (gz, x, their repacked B panels, ~600 KiB at d = 768) took ~80 us, a third
// of a training step of N = 8 rows (270 us against fp32's 97 us; Zen 4, perf).
// ADAPTERFAST_CPU_POISON_SCRATCH=1 fills the uninitialised ones with all-ones bytes (NaN in
// float, bf16 and float16), so that a test run in that mode fails wherever a buffer is read
// before it is written (tests/test_cpu_brgemm.py runs the 16-bit and grouped tests so). The
// drivers' output and partial-sum tensors (empty_output, adapter_common.h) are poisoned too.
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#include "env.h"

namespace adapterfast::cpu {

inline bool poison_scratch() {
  static const bool on = env_is("ADAPTERFAST_CPU_POISON_SCRATCH", "1");
  return on;
}

template <typename T>
class Scratch {
  static_assert(std::is_trivially_copyable_v<T> && std::is_trivially_default_constructible_v<T>,
                "Scratch holds plain values only");

 public:
  Scratch() = default;
  // n values, uninitialised: for buffers every read of which is preceded by a write.
  explicit Scratch(int64_t n) : data_(n > 0 ? std::make_unique_for_overwrite<T[]>(n) : nullptr), size_(n) {
    if (n > 0 && poison_scratch()) std::memset(data_.get(), 0xFF, static_cast<size_t>(n) * sizeof(T));
  }

  // n values, all bits zero (0.0 in float, bf16 and float16): for buffers whose pad rows or
  // columns are read as zeros and never written.
  static Scratch zeroed(int64_t n) {
    Scratch s(n);
    if (n > 0) std::memset(s.data(), 0, static_cast<size_t>(n) * sizeof(T));
    return s;
  }

  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  int64_t size() const { return size_; }
  T& operator[](int64_t i) { return data_[i]; }
  const T& operator[](int64_t i) const { return data_[i]; }

 private:
  std::unique_ptr<T[]> data_;
  int64_t size_ = 0;
};

}  // namespace adapterfast::cpu
