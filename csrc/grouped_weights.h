#pragma once
// The stacked weights of the grouped op as per-adapter matmul operands: for the fp32/fp64 block
// kernels (stacked_operand) and for brgemm's 16-bit B layouts (packed_operand).
//
// Weights are prepared only for the adapters that have rows (a batch naming 2 of 32 adapters
// converts 2), by direct loops that read the nn.Linear layouts as they are (no transposed copy by
// torch first): one adapter at a time (adapter_operand, which the fp32/fp64 forward calls per
// thread as it reaches an adapter's blocks), or all used ones once per call in parallel into a
// per-thread workspace (stacked_operand, packed_operand).
#include <algorithm>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "block_kernels.h"
#include "matrix_copy.h"
#include "brgemm.h"

namespace adapterfast::cpu::grouped {

// Calls fn(S{}) for a weight dtype.
template <typename Fn>
void dispatch_weight(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    case at::kDouble: return fn(double{});
    default: TORCH_CHECK_TYPE(false, "adapterfast grouped op: unsupported weight dtype ", dtype);
  }
}

// Storage for the prepared weights that lives with the calling thread and is reused by its later
// calls. A fresh [A, d, r] buffer from the allocator is, past malloc's mmap threshold, new pages
// on every call, and faulting them in cost more than preparing the weights (measured with perf:
// page faults and clearing ahead of the conversion loop itself at A = 32, d = 768, r = 16). Holds
// the largest size a thread has asked for, per slot (the two weights of one call).
template <typename V>
V* workspace(int slot, int64_t count) {
  thread_local std::vector<V> buffers[2];
  std::vector<V>& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(count);
  return buffer.data();
}

// A weight element as a matmul operand: rounded to x's storage type T (as autocast would), as V.
template <typename T, typename V, typename S>
inline V operand_value(S s) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return static_cast<V>(static_cast<T>(s));
  } else {
    return static_cast<V>(static_cast<T>(static_cast<float>(s)));
  }
}

// Adapter a's weight w[a] [P, Q] (w contiguous) as a matmul operand of acc_t rounded to x's
// storage type T, into dst: [Q, P] with `transpose`, else [P, Q].
template <typename T, typename acc_t>
void adapter_operand(const at::Tensor& w, int64_t a, bool transpose, acc_t* dst) {
  const int64_t P = w.size(1);
  const int64_t Q = w.size(2);
  dispatch_weight(w.scalar_type(), [&](auto s) {
    using S = decltype(s);
    const S* in = w.data_ptr<S>() + a * P * Q;
    if constexpr (std::is_same_v<S, float> && std::is_same_v<acc_t, float> && std::is_same_v<T, float>) {
      if (transpose) return block_kernels<float>().transpose(P, Q, in, Q, dst);
    }
    copy_matrix(in, Q, 1, P, Q, transpose, dst, [](S v) { return operand_value<T, acc_t>(v); });
  });
}

// The stacked weight w [A, P, Q] as per-adapter matmul operands of acc_t, rounded to x's storage
// type T: [A, Q, P] with `transpose`, else [A, P, Q]. Only the `used` adapters are filled; the
// result is w's own data when that already is the operand, else workspace `slot`.
template <typename T, typename acc_t>
const acc_t* stacked_operand(const at::Tensor& w, bool transpose, const std::vector<int64_t>& used, int slot) {
  const int64_t P = w.size(1);
  const int64_t Q = w.size(2);
  constexpr at::ScalarType acc = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  if (!transpose && w.scalar_type() == acc && std::is_same_v<T, acc_t> && w.is_contiguous()) {
    return w.data_ptr<acc_t>();
  }
  acc_t* dst = workspace<acc_t>(slot, w.size(0) * P * Q);
  const at::Tensor src = w.contiguous();
  at::parallel_for(0, static_cast<int64_t>(used.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t u = first; u < last; ++u) adapter_operand<T, acc_t>(src, used[u], transpose, dst + used[u] * P * Q);
  });
  return dst;
}

// One adapter's [P, Q] weight in T: `in` itself when S is T, else converted into `scratch`
// (float weights 8 values per instruction, narrow_row).
template <typename T, typename S>
const T* weight_in(const S* in, int64_t size, std::vector<T>& scratch) {
  if constexpr (std::is_same_v<S, T>) {
    return in;
  } else {
    scratch.resize(size);
    if constexpr (std::is_same_v<S, float>) {
      narrow_row(in, 1.0f, scratch.data(), size);
    } else {
      for (int64_t k = 0; k < size; ++k) scratch[k] = operand_value<T, T>(in[k]);
    }
    return scratch.data();
  }
}

// The stacked weight w [A, P, Q] as per-adapter brgemm B operands of 16-bit T (see brgemm.h) for
// the product with K rows and N columns: B[k, n] = w[a, k, n] (K = P) or, with `transpose`,
// w[a, n, k] (K = Q). Each adapter's operand takes even(K) * N elements (the pad row zero);
// only the `used` adapters are filled, in workspace `slot`.
template <typename T>
const T* packed_operand(BrgemmLayout layout, const at::Tensor& w, bool transpose, const std::vector<int64_t>& used,
                        int slot) {
  const int64_t P = w.size(1);
  const int64_t Q = w.size(2);
  const int64_t K = transpose ? Q : P;
  const int64_t N = transpose ? P : Q;
  const int64_t size = (K + (K & 1)) * N;
  T* out = workspace<T>(slot, w.size(0) * size);
  const at::Tensor src = w.contiguous();
  dispatch_weight(src.scalar_type(), [&](auto s) {
    using S = decltype(s);
    const S* data = src.data_ptr<S>();
    at::parallel_for(0, static_cast<int64_t>(used.size()), 1, [&](int64_t first, int64_t last) {
      std::vector<T> scratch;
      for (int64_t u = first; u < last; ++u) {
        const T* weight = weight_in<T>(data + used[u] * P * Q, P * Q, scratch);
        weight_as_b<T>(layout, P, Q, weight, transpose, out + used[u] * size, N);
      }
    });
  });
  return out;
}

}  // namespace adapterfast::cpu::grouped
