#pragma once
// What the grouped forward and backward (grouped_forward.cpp, grouped_backward.cpp) share: the
// operand checks of the stacked weights, the rows sorted into one segment per adapter and cut
// into blocks, the copies of a block's rows between the [N, d] tensors and a block-sized scratch,
// and the adapters' weights prepared as matmul operands.
//
// Rows arrive in any order, so a block's rows are scattered over x: each row is copied as one
// contiguous run, and while row i of a block is copied, row i of the next block is prefetched
// into L2. A row of a random permutation starts on a new page, where the hardware prefetcher
// has no history, so without this every row starts with a full memory latency; one block ahead,
// the prefetches have the block's GEMMs to complete in, and they fit in L2 (64 rows of d).
//
// Weights are prepared once per call and only for the adapters that have rows (a batch naming
// 2 of 32 adapters converts 2), in parallel over those adapters, by direct loops that read the
// nn.Linear layouts as they are (no transposed copy by torch first).
#include <algorithm>
#include <cstring>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "adapter_common.h"
#include "brgemm.h"

namespace adapterfast::cpu::grouped {

// Rows sorted by adapter: order[offsets[s] .. offsets[s + 1]) are the rows of slot s, where slot 0
// holds the rows without an adapter and slot a + 1 those of adapter a; original order is kept
// within a slot (a stable counting sort, O(N)).
struct Segments {
  std::vector<int64_t> order;
  std::vector<int64_t> offsets;

  int64_t rows(int64_t slot) const { return offsets[slot + 1] - offsets[slot]; }

  // The adapters with at least one row, in increasing order.
  std::vector<int64_t> used() const {
    std::vector<int64_t> out;
    for (int64_t a = 0; a + 2 < static_cast<int64_t>(offsets.size()); ++a) {
      if (rows(a + 1) > 0) out.push_back(a);
    }
    return out;
  }
};

inline Segments sort_rows(const char* op, const at::Tensor& adapter_index, int64_t n, int64_t adapters) {
  TORCH_CHECK_VALUE(adapter_index.dim() == 1 && adapter_index.size(0) == n, op,
                    ": adapter_index must be 1-D with one entry per row of x (", n, "), got shape ",
                    adapter_index.sizes());
  TORCH_CHECK_TYPE(!at::isFloatingType(adapter_index.scalar_type()) && adapter_index.scalar_type() != at::kBool,
                   op, ": adapter_index must be an integer tensor, got ", adapter_index.scalar_type());
  const at::Tensor index = adapter_index.to(at::kLong).contiguous();
  const int64_t* idx = index.data_ptr<int64_t>();
  Segments seg;
  seg.offsets.assign(adapters + 2, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t a = idx[i];
    TORCH_CHECK_VALUE(a >= -1 && a < adapters, op, ": adapter_index must be in [-1, ", adapters,
                      ") for a bank of ", adapters, " adapters, got ", a, " at row ", i);
    ++seg.offsets[a + 2];
  }
  for (int64_t s = 1; s < adapters + 2; ++s) seg.offsets[s] += seg.offsets[s - 1];
  std::vector<int64_t> next(seg.offsets.begin(), seg.offsets.end() - 1);
  seg.order.resize(n);
  for (int64_t i = 0; i < n; ++i) seg.order[next[idx[i] + 1]++] = i;
  return seg;
}

// A block: rows order[begin, end) of one adapter, at most kBlockRows of them.
struct Block {
  int64_t adapter;
  int64_t begin;
  int64_t end;
};

inline std::vector<Block> adapter_blocks(const Segments& seg, int64_t adapter) {
  std::vector<Block> blocks;
  const int64_t end = seg.offsets[adapter + 2];
  for (int64_t begin = seg.offsets[adapter + 1]; begin < end; begin += kBlockRows) {
    blocks.push_back({adapter, begin, std::min(begin + kBlockRows, end)});
  }
  return blocks;
}

inline std::vector<Block> all_blocks(const Segments& seg, int64_t adapters) {
  std::vector<Block> blocks;
  for (int64_t a = 0; a < adapters; ++a) {
    const std::vector<Block> mine = adapter_blocks(seg, a);
    blocks.insert(blocks.end(), mine.begin(), mine.end());
  }
  return blocks;
}

// Shapes of the stacked operands: x [n, d], w_down [A, r, d], w_up [A, d, r], b_down [A, r],
// b_up [A, d], scales [A]. Dtype and device checks are those of the single-adapter op (adapter 0).
inline Dims check_stacked(const char* op, const at::Tensor& x, const at::Tensor& w_down,
                          const std::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                          const std::optional<at::Tensor>& b_up, const at::Tensor& scales) {
  TORCH_CHECK_VALUE(w_down.dim() == 3 && w_up.dim() == 3 && w_down.size(0) >= 1 && w_up.size(0) == w_down.size(0),
                    op, ": w_down must be [A, r, d] and w_up [A, d, r] with A >= 1, got ", w_down.sizes(), " and ",
                    w_up.sizes());
  const int64_t adapters = w_down.size(0);
  if (b_down) TORCH_CHECK_VALUE(b_down->dim() == 2 && b_down->size(0) == adapters, op, ": b_down must be [A, r], got ", b_down->sizes());
  if (b_up) TORCH_CHECK_VALUE(b_up->dim() == 2 && b_up->size(0) == adapters, op, ": b_up must be [A, d], got ", b_up->sizes());
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == adapters, op, ": scales must be [A] = [", adapters,
                    "], got ", scales.sizes());
  std::optional<at::Tensor> bd0, bu0;
  if (b_down) bd0 = b_down->select(0, 0);
  if (b_up) bu0 = b_up->select(0, 0);
  return check_operands(op, x, w_down.select(0, 0), bd0, w_up.select(0, 0), bu0);
}

// Per-adapter scales divided by 1 - p.
inline std::vector<double> scale_values(const at::Tensor& scales, double dropout_p) {
  const at::Tensor s = scales.to(at::kDouble).contiguous();
  std::vector<double> out(s.data_ptr<double>(), s.data_ptr<double>() + s.numel());
  if (dropout_p > 0.0) {
    for (double& v : out) v /= (1.0 - dropout_p);
  }
  return out;
}

// Rows this many places ahead in the sorted row list are prefetched while one is copied: the
// same row of the next block.
constexpr int64_t kPrefetchAhead = kBlockRows;

inline void prefetch_bytes(const char* p, int64_t bytes) {
#if defined(__AVX__)
  for (int64_t k = 0; k < bytes; k += 64) _mm_prefetch(p + k, _MM_HINT_T1);
#else
  (void)p;
  (void)bytes;
#endif
}

// dst[i] = row order[i] of the 2-D tensor t of T, as acc_t, for i < m (dst rows of width ld_dst).
// `ahead` more entries of order may be read (for prefetching): the caller passes the rows left.
template <typename T, typename acc_t>
void gather_rows(const at::Tensor& t, const int64_t* order, int64_t m, int64_t ahead, acc_t* dst, int64_t ld_dst) {
  const T* data = t.data_ptr<T>();
  const int64_t width = t.size(1);
  const int64_t rs = t.stride(0);
  const int64_t cs = width == 1 ? 1 : t.stride(1);
  for (int64_t i = 0; i < m; ++i) {
    if (cs == 1 && i + kPrefetchAhead < ahead) {
      prefetch_bytes(reinterpret_cast<const char*>(data + order[i + kPrefetchAhead] * rs), width * sizeof(T));
    }
    const T* src = data + order[i] * rs;
    acc_t* out = dst + i * ld_dst;
    if (cs == 1 && std::is_same_v<T, acc_t>) {
      std::memcpy(out, src, width * sizeof(acc_t));
    } else if (cs == 1) {
      for (int64_t k = 0; k < width; ++k) out[k] = static_cast<acc_t>(src[k]);
    } else {
      for (int64_t k = 0; k < width; ++k) out[k] = static_cast<acc_t>(src[k * cs]);
    }
  }
}

// Copies rows order[.] of a tensor with unit column stride into dst [m, width], bytewise.
inline void gather_bytes(const at::Tensor& t, const int64_t* order, int64_t m, int64_t ahead, char* dst) {
  const char* data = static_cast<const char*>(t.data_ptr());
  const int64_t row_bytes = t.size(1) * t.element_size();
  const int64_t stride_bytes = t.stride(0) * t.element_size();
  for (int64_t i = 0; i < m; ++i) {
    if (i + kPrefetchAhead < ahead) prefetch_bytes(data + order[i + kPrefetchAhead] * stride_bytes, row_bytes);
    std::memcpy(dst + i * row_bytes, data + order[i] * stride_bytes, row_bytes);
  }
}

// Writes the dense rows src [m, d] of T to rows order[.] of the contiguous out [n, d]. With
// `stream`, rows whose bytes are 32-byte aligned are written with non-temporal stores, as the
// single-adapter op writes its large outputs: no read-for-ownership of the destination lines and
// no eviction of the block's inputs (the caller issues the fence).
template <typename T>
void scatter_rows(const T* src, const int64_t* order, int64_t m, int64_t d, T* out, bool stream) {
  const int64_t bytes = d * static_cast<int64_t>(sizeof(T));
#if defined(__AVX__)
  if (stream && bytes % 32 == 0 && reinterpret_cast<uintptr_t>(out) % 32 == 0) {
    for (int64_t i = 0; i < m; ++i) {
      const char* s = reinterpret_cast<const char*>(src + i * d);
      char* o = reinterpret_cast<char*>(out + order[i] * d);
      for (int64_t k = 0; k < bytes; k += 32) {
        _mm256_stream_si256(reinterpret_cast<__m256i*>(o + k),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + k)));
      }
    }
    return;
  }
#endif
  (void)stream;
  for (int64_t i = 0; i < m; ++i) std::memcpy(out + order[i] * d, src + i * d, bytes);
}

// dst = the r values of src, one row of h: written with non-temporal stores when the row is whole
// 32-byte aligned chunks (rows of h are written in a random order, where each ordinary store would
// first read its line), else copied.
template <typename acc_t>
inline void write_h_row(acc_t* dst, const acc_t* src, int64_t r) {
  const int64_t bytes = r * static_cast<int64_t>(sizeof(acc_t));
#if defined(__AVX__)
  if (bytes % 32 == 0 && reinterpret_cast<uintptr_t>(dst) % 32 == 0) {
    for (int64_t k = 0; k < bytes; k += 32) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(reinterpret_cast<char*>(dst) + k),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const char*>(src) + k)));
    }
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

inline void store_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// out[row] = src[row] converted to T for each listed row (src float32, bfloat16 or float64 with
// unit column stride), or zeros without src: the rows without an adapter.
template <typename T, typename S>
void copy_rows_from(const S* src, int64_t ld_src, const int64_t* order, int64_t m, int64_t d, T* out) {
  using wide = std::conditional_t<std::is_same_v<T, double> || std::is_same_v<S, double>, double, float>;
  at::parallel_for(0, m, 256, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const S* s = src + order[i] * ld_src;
      T* dst = out + order[i] * d;
      for (int64_t k = 0; k < d; ++k) {
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          dst[k] = static_cast<T>(static_cast<float>(static_cast<wide>(s[k])));
        } else {
          dst[k] = static_cast<T>(static_cast<wide>(s[k]));
        }
      }
    }
  });
}

template <typename T>
void copy_plain_rows(const std::optional<at::Tensor>& src, const int64_t* order, int64_t m, int64_t d, T* out) {
  if (!src) {
    at::parallel_for(0, m, 256, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) std::fill(out + order[i] * d, out + (order[i] + 1) * d, T(0));
    });
    return;
  }
  const at::Tensor t = with_unit_column_stride(*src);
  switch (t.scalar_type()) {
    case at::kFloat: return copy_rows_from(t.data_ptr<float>(), t.stride(0), order, m, d, out);
    case at::kBFloat16: return copy_rows_from(t.data_ptr<c10::BFloat16>(), t.stride(0), order, m, d, out);
    case at::kDouble: return copy_rows_from(t.data_ptr<double>(), t.stride(0), order, m, d, out);
    default: TORCH_CHECK_TYPE(false, "adapterfast grouped op: unsupported residual dtype ", t.scalar_type());
  }
}

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

// out [Q, P] = in [P, Q]^T for float: 8 x 8 tiles transposed in AVX registers (scalar loops
// over single elements ran at ~1 ns per element here, the largest per-adapter cost of a call),
// the edges element by element.
inline void transpose_floats(const float* in, int64_t P, int64_t Q, float* out) {
  int64_t p0 = 0;
#if defined(__AVX__)
  for (; p0 + 8 <= P; p0 += 8) {
    int64_t q0 = 0;
    for (; q0 + 8 <= Q; q0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + (p0 + i) * Q + q0);
      const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
      const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
      const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
      const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      const __m256 c[8] = {_mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
                           _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
                           _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
                           _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + (q0 + j) * P + p0, c[j]);
    }
    for (; q0 < Q; ++q0) {
      for (int64_t p = p0; p < p0 + 8; ++p) out[q0 * P + p] = in[p * Q + q0];
    }
  }
#endif
  for (; p0 < P; ++p0) {
    for (int64_t q = 0; q < Q; ++q) out[q * P + p0] = in[p0 * Q + q];
  }
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
  dispatch_weight(src.scalar_type(), [&](auto s) {
    using S = decltype(s);
    const S* data = src.data_ptr<S>();
    at::parallel_for(0, static_cast<int64_t>(used.size()), 1, [&](int64_t first, int64_t last) {
      for (int64_t u = first; u < last; ++u) {
        const S* in = data + used[u] * P * Q;
        acc_t* o = dst + used[u] * P * Q;
        if constexpr (std::is_same_v<S, float> && std::is_same_v<acc_t, float> && std::is_same_v<T, float>) {
          if (transpose) {
            transpose_floats(in, P, Q, o);
            continue;
          }
        }
        if (transpose) {
          // In 16 x 16 tiles, so that the rows of `in` a tile reads stay in L1 (a plain loop over
          // one column at a time reads d/16 lines per column of the [d, r] weight).
          constexpr int64_t kTile = 16;
          for (int64_t p0 = 0; p0 < P; p0 += kTile) {
            const int64_t p1 = std::min(P, p0 + kTile);
            for (int64_t q0 = 0; q0 < Q; q0 += kTile) {
              const int64_t q1 = std::min(Q, q0 + kTile);
              for (int64_t q = q0; q < q1; ++q) {
                for (int64_t p = p0; p < p1; ++p) o[q * P + p] = operand_value<T, acc_t>(in[p * Q + q]);
              }
            }
          }
        } else {
          for (int64_t k = 0; k < P * Q; ++k) o[k] = operand_value<T, acc_t>(in[k]);
        }
      }
    });
  });
  return dst;
}

// One adapter's [P, Q] weight in T: `in` itself when S is T, else converted into `scratch`.
template <typename T, typename S>
const T* weight_in(const S* in, int64_t size, std::vector<T>& scratch) {
  if constexpr (std::is_same_v<S, T>) {
    return in;
  } else {
    scratch.resize(size);
    for (int64_t k = 0; k < size; ++k) scratch[k] = operand_value<T, T>(in[k]);
    return scratch.data();
  }
}

// w [P, Q] of 16-bit T as the B operand (K rows, N columns, ldb = N; even(K) rows, the pad row
// zero): B[k, n] = w[k, n] (K = P), or with `transpose` w[n, k] (K = Q). In the VNNI layout a
// 32-bit word holds B[2j, n] and B[2j + 1, n], which are two adjacent elements of w when
// transposed and an element of two adjacent rows of w otherwise, so both are built as words.
template <typename T>
void pack_16bit(BrgemmLayout layout, const T* w, int64_t P, int64_t Q, bool transpose, T* out) {
  static_assert(sizeof(T) == 2);
  const int64_t K = transpose ? Q : P;
  const int64_t N = transpose ? P : Q;
  const uint16_t* in = reinterpret_cast<const uint16_t*>(w);
  // Element (k, n) of B as bits, 0 past the last row.
  auto at = [&](int64_t k, int64_t n) -> uint32_t {
    if (k >= K) return 0;
    return transpose ? in[n * Q + k] : in[k * Q + n];
  };
  if (layout == BrgemmLayout::vnni) {
    uint32_t* words = reinterpret_cast<uint32_t*>(out);
    for (int64_t j = 0; 2 * j < K; ++j) {
      uint32_t* __restrict o = words + j * N;
      if (transpose && 2 * j + 1 < K) {
        for (int64_t n = 0; n < N; ++n) o[n] = uint32_t(in[n * Q + 2 * j]) | (uint32_t(in[n * Q + 2 * j + 1]) << 16);
      } else if (!transpose && 2 * j + 1 < K) {
        const uint16_t* __restrict r0 = in + 2 * j * Q;
        const uint16_t* __restrict r1 = r0 + Q;
        for (int64_t n = 0; n < N; ++n) o[n] = uint32_t(r0[n]) | (uint32_t(r1[n]) << 16);
      } else {
        for (int64_t n = 0; n < N; ++n) o[n] = at(2 * j, n) | (at(2 * j + 1, n) << 16);
      }
    }
    return;
  }
  uint16_t* bits = reinterpret_cast<uint16_t*>(out);
  const int64_t k_even = K + (K & 1);
  for (int64_t k = 0; k < k_even; ++k) {
    for (int64_t n = 0; n < N; ++n) bits[k * N + n] = static_cast<uint16_t>(at(k, n));
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
        pack_16bit<T>(layout, weight, P, Q, transpose, out + used[u] * size);
      }
    });
  });
  return out;
}

}  // namespace adapterfast::cpu::grouped
