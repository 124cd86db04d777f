#pragma once
// What the grouped forward and backward (grouped_forward.cpp, grouped_backward.cpp) share: the
// operand checks of the stacked weights, the rows sorted into one segment per adapter and cut
// into blocks, and the copies of a block's input rows (x, grad_y) from the [N, d] tensors into
// a block-sized scratch, for the GEMMs that take a dense operand (brgemm; the block kernels on
// 16-bit or column-strided rows): fp32/fp64 rows are read in place through the block's row list
// instead (grouped_row_kernels.h). Output rows (y, dx) are not copied: the output epilogue writes
// them in place through the row list (block_kernels.h, OutputEpilogue::out_rows). The adapters'
// weights as matmul operands: grouped_weights.h.
//
// Rows arrive in any order, so a block's rows are scattered over x: each row is copied as one
// contiguous run, and while row i of a block is copied, row i of the next block is prefetched
// into L2. A row of a random permutation starts on a new page, where the hardware prefetcher
// has no history, so without this every row starts with a full memory latency; one block ahead,
// the prefetches have the block's GEMMs to complete in, and they fit in L2 (64 rows of d).
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

// Outputs written through a row list (y, dx: rows in adapter order, scattered over [N, d]) are
// written with non-temporal stores from this size on (OutputEpilogue::stream_out), inference y
// too (the single-adapter ops' stream_output waits for 6 MiB there; it was 16 MiB for every output
// when this was measured): an ordinary store to a scattered row first reads the
// row's lines for ownership, a demand miss per row that no hardware prefetcher anticipates, and
// those reads share the core's line fill buffers with the input rows' reads. bf16, N = 8192,
// d = 768, r = 16, A = 32 (dx and y 12 MiB, then under the single ops' 16 MiB), 1 thread, Xeon with
// AMX-BF16: the backward from 1.58-1.77x to 1.44-1.63x of the single adapter's, the forward
// from 1.25-1.36x to 1.09-1.25x, alternating in one process; at N = 1024 to 4096 no slower.
// Below about an L2 the output may still be in cache for whatever reads it next.
constexpr int64_t kScatteredStreamBytes = int64_t(2) << 20;

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

// out[row] = src[row] converted to T for each listed row (src float32, bfloat16, float16 or float64 with
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
    case at::kHalf: return copy_rows_from(t.data_ptr<c10::Half>(), t.stride(0), order, m, d, out);
    case at::kDouble: return copy_rows_from(t.data_ptr<double>(), t.stride(0), order, m, d, out);
    default: TORCH_CHECK_TYPE(false, "adapterfast grouped op: unsupported residual dtype ", t.scalar_type());
  }
}

}  // namespace adapterfast::cpu::grouped
