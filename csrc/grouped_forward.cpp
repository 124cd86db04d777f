// The grouped forward on CPU (adapterfast_cpu::grouped_forward): row i of x goes through adapter
// adapter_index[i] of a bank of A adapters, or through none when the index is -1 (y = residual).
// Semantics: adapterfast/grouped_reference.py.
//
// Rows are counting-sorted by adapter and each adapter's rows cut into blocks of at most
// kBlockRows rows (grouped_rows.h), so a block runs the single-adapter op's GEMMs with its
// adapter's weights:
// - float32 and float64: the block kernels (block_kernels.h) on the block's x rows gathered into
//   a cache-resident scratch; the output rows are formed in scratch and streamed to their rows of y;
// - bfloat16 and float16 where brgemm runs (brgemm.h): h = x Wd^T and u = act(h) Wu^T on brgemm
//   (AMX or AVX512-BF16/FP16), as the single-adapter op's 16-bit driver does, the epilogue (bias,
//   dropout, scale, residual) applied per column chunk into a block-sized scratch.
// Per row, x is read from memory once and y written once, whatever the order of the rows: the
// output rows leave the scratch with non-temporal stores (grouped_rows.h, scatter_rows), so a
// row of y is never read for ownership, which stores into scattered rows could not hide.
#include "grouped_ops.h"

#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "activations.h"
#include "adapter_common.h"
#include "brgemm.h"
#include "grouped_rows.h"
#include "grouped_weights.h"
#include "philox.h"

namespace adapterfast::cpu {
namespace {

using namespace grouped;
using at::native::cpublas::brgemm;
using at::native::cpublas::brgemm_release;

constexpr const char* kForward = "adapterfast_cpu::grouped_forward";

// Output columns per brgemm call: a [64, 256] fp32 product (64 KiB) stays in L2 for its epilogue.
constexpr int64_t kOutCols = 256;

inline int64_t even(int64_t v) { return v + (v & 1); }

struct ForwardOperands {
  Dims dims;
  int64_t adapters;
  at::Tensor x;
  at::Tensor w_down;                   // [A, r, d], as given
  at::Tensor w_up;                     // [A, d, r], as given
  std::optional<at::Tensor> b_down;    // [A, r], accumulation type
  std::optional<at::Tensor> b_up;      // [A, d], accumulation type
  std::optional<at::Tensor> residual;  // columns contiguous
  std::vector<double> scales;          // divided by 1 - p
  Activation activation;
  double dropout_p;
  uint64_t seed;
};

// The epilogue fields common to all blocks.
template <typename acc_t>
OutputEpilogue<acc_t> base_epilogue(const ForwardOperands& op, const at::Tensor& y) {
  OutputEpilogue<acc_t> e;
  e.out_kind = kind_of(y.scalar_type());
  e.ld_out = op.dims.d;
  e.ld_keep = keep_row_bytes(op.dims.d);
  e.ld_res = op.dims.d;
  if (op.residual) e.res_kind = kind_of(op.residual->scalar_type());
  return e;
}

// h rows of a block: the block's products hb [m, r] plus the bias, copied to their rows of h.
template <typename acc_t>
void finish_h(acc_t* hb, const acc_t* bias, const int64_t* rows, int64_t m, int64_t r, acc_t* h_data) {
  for (int64_t i = 0; i < m; ++i) {
    if (bias != nullptr) {
      for (int64_t j = 0; j < r; ++j) hb[i * r + j] += bias[j];
    }
    write_h_row(h_data + rows[i] * r, hb + i * r, r);
  }
}

template <typename T, typename acc_t>
void forward_blocks(const ForwardOperands& op, const Segments& seg, at::Tensor& y, at::Tensor& h) {
  const BlockKernels<acc_t>& kernels = block_kernels<acc_t>();
  const auto [n, d, r] = op.dims;
  const std::vector<int64_t> used = seg.used();
  const acc_t* w_down_t = stacked_operand<T, acc_t>(op.w_down, /*transpose=*/true, used, 0);  // [A, d, r]
  const acc_t* w_up_t = stacked_operand<T, acc_t>(op.w_up, /*transpose=*/true, used, 1);      // [A, r, d]
  const std::vector<Block> blocks = all_blocks(seg, op.adapters);
  const int64_t sorted_end = seg.offsets.back();
  const acc_t* b_down = op.b_down ? op.b_down->data_ptr<acc_t>() : nullptr;
  const acc_t* b_up = op.b_up ? op.b_up->data_ptr<acc_t>() : nullptr;
  acc_t* h_data = h.data_ptr<acc_t>();
  T* y_data = y.data_ptr<T>();
  const bool dropout = op.dropout_p > 0.0;
  const uint32_t threshold = philox::threshold(op.dropout_p);
  const int64_t ld_keep = keep_row_bytes(d);
  const int64_t res_bytes = op.residual ? op.residual->element_size() : 0;
  const bool stream = y.nbytes() >= kStreamOutputBytes;
  OutputEpilogue<acc_t> epilogue = base_epilogue<acc_t>(op, y);
  if (!op.residual) epilogue.res_kind = std::is_same_v<acc_t, double> ? Kind::f64 : Kind::f32;

  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t first, int64_t last) {
    std::vector<acc_t> xb(kBlockRows * d);
    std::vector<acc_t> hb(kBlockRows * r);
    std::vector<acc_t> a(kBlockRows * r);
    std::vector<T> yb(kBlockRows * d);
    std::vector<char> res(kBlockRows * d * res_bytes);
    std::vector<uint8_t> keep(dropout ? kBlockRows * ld_keep : 0);
    OutputEpilogue<acc_t> e = epilogue;
    for (int64_t b = first; b < last; ++b) {
      const Block& block = blocks[b];
      const int64_t m = block.end - block.begin;
      const int64_t adapter = block.adapter;
      const int64_t* rows = seg.order.data() + block.begin;
      const int64_t ahead = sorted_end - block.begin;

      gather_rows<T, acc_t>(op.x, rows, m, ahead, xb.data(), d);
      kernels.project_in(m, r, d, xb.data(), d, w_down_t + adapter * d * r, r, hb.data(), r);
      finish_h(hb.data(), b_down != nullptr ? b_down + adapter * r : nullptr, rows, m, r, h_data);
      visit<acc_t>(op.activation, [&](auto f) {
        for (int64_t idx = 0; idx < m * r; ++idx) a[idx] = round_as<T>(f.value(hb[idx]));
      });

      if (dropout) {
        for (int64_t i = 0; i < m; ++i) kernels.dropout_keep(op.seed, threshold, rows[i], 1, d, keep.data() + i * ld_keep, ld_keep);
      }
      e.keep = dropout ? keep.data() : nullptr;
      if (op.residual) {
        gather_bytes(*op.residual, rows, m, ahead, res.data());
        e.res = res.data();
      } else {
        e.res = xb.data();
      }
      e.bias = b_up != nullptr ? b_up + adapter * d : nullptr;
      e.scale = static_cast<acc_t>(op.scales[adapter]);
      e.out = yb.data();
      kernels.project_out(m, r, d, a.data(), r, w_up_t + adapter * r * d, d, e);
      scatter_rows(yb.data(), rows, m, d, y_data, stream);
    }
    store_fence();
  });
}

// forward_blocks on brgemm for 16-bit T (see the file comment).
template <typename T>
void forward_blocks_brgemm(const ForwardOperands& op, BrgemmLayout layout, const Segments& seg, at::Tensor& y,
                           at::Tensor& h) {
  const auto [n, d, r] = op.dims;
  const int64_t rp = even(r);
  const int64_t dp = even(d);
  const bool vnni = layout == BrgemmLayout::vnni;
  const std::vector<int64_t> used = seg.used();
  const T* w_down_b = packed_operand<T>(layout, op.w_down, /*transpose=*/true, used, 0);  // [A][dp, r]
  const T* w_up_b = packed_operand<T>(layout, op.w_up, /*transpose=*/true, used, 1);      // [A][rp, d]
  const std::vector<Block> blocks = all_blocks(seg, op.adapters);
  const int64_t sorted_end = seg.offsets.back();
  const float* b_down = op.b_down ? op.b_down->data_ptr<float>() : nullptr;
  const float* b_up = op.b_up ? op.b_up->data_ptr<float>() : nullptr;
  float* h_data = h.data_ptr<float>();
  T* y_data = y.data_ptr<T>();
  const bool dropout = op.dropout_p > 0.0;
  const uint32_t threshold = philox::threshold(op.dropout_p);
  const int64_t ld_keep = keep_row_bytes(d);
  const BlockKernels<float>& kernels = block_kernels<float>();
  const int64_t res_bytes = op.residual ? op.residual->element_size() : 0;
  const bool stream = y.nbytes() >= kStreamOutputBytes;
  OutputEpilogue<float> epilogue = base_epilogue<float>(op, y);
  if (!op.residual) {
    epilogue.res_kind = kind_of(op.x.scalar_type());
    epilogue.ld_res = dp;
  }

  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t first, int64_t last) {
    std::vector<T> xb(kBlockRows * dp, T(0.0f));
    std::vector<float> hb(kBlockRows * r);
    std::vector<T> a(kBlockRows * rp, T(0.0f));
    std::vector<float> chunk(kBlockRows * kOutCols);
    std::vector<T> yb(kBlockRows * d);
    std::vector<char> res(kBlockRows * d * res_bytes);
    std::vector<uint8_t> keep(dropout ? kBlockRows * ld_keep : 0);
    OutputEpilogue<float> e = epilogue;
    for (int64_t b = first; b < last; ++b) {
      const Block& block = blocks[b];
      const int64_t m = block.end - block.begin;
      const int64_t adapter = block.adapter;
      const int64_t* rows = seg.order.data() + block.begin;
      const int64_t ahead = sorted_end - block.begin;

      gather_rows<T, T>(op.x, rows, m, ahead, xb.data(), dp);
      brgemm(m, r, dp, dp, r, r, false, xb.data(), w_down_b + adapter * dp * r, hb.data(), vnni);
      finish_h(hb.data(), b_down != nullptr ? b_down + adapter * r : nullptr, rows, m, r, h_data);
      visit<float>(op.activation, [&](auto f) {
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < r; ++j) a[i * rp + j] = static_cast<T>(f.value(hb[i * r + j]));
        }
      });
      if (dropout) {
        for (int64_t i = 0; i < m; ++i) kernels.dropout_keep(op.seed, threshold, rows[i], 1, d, keep.data() + i * ld_keep, ld_keep);
      }
      e.keep = dropout ? keep.data() : nullptr;
      if (op.residual) {
        gather_bytes(*op.residual, rows, m, ahead, res.data());
        e.res = res.data();
      } else {
        e.res = xb.data();
      }
      e.bias = b_up != nullptr ? b_up + adapter * d : nullptr;
      e.scale = static_cast<float>(op.scales[adapter]);
      e.out = yb.data();
      const T* w_up = w_up_b + adapter * rp * d;
      for (int64_t n0 = 0; n0 < d; n0 += kOutCols) {
        const int64_t nc = std::min(kOutCols, d - n0);
        brgemm(m, nc, rp, rp, d, nc, false, a.data(), w_up + b_column(layout, n0), chunk.data(), vnni);
        avx512::finish_rows(m, nc, chunk.data(), nc, n0, e);
      }
      scatter_rows(yb.data(), rows, m, d, y_data, stream);
    }
    store_fence();
    brgemm_release(vnni);
  });
}

// y = residual (or x) and h = 0 on the rows without an adapter.
template <typename T, typename acc_t>
void plain_rows(const ForwardOperands& op, const Segments& seg, at::Tensor& y, at::Tensor& h) {
  const int64_t plain = seg.rows(0);
  if (plain == 0) return;
  const auto [n, d, r] = op.dims;
  const int64_t* rows = seg.order.data();
  copy_plain_rows<T>(op.residual ? op.residual : std::optional<at::Tensor>(op.x), rows, plain, d, y.data_ptr<T>());
  acc_t* h_data = h.data_ptr<acc_t>();
  for (int64_t i = 0; i < plain; ++i) std::fill(h_data + rows[i] * r, h_data + (rows[i] + 1) * r, acc_t(0));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> grouped_forward(
    const at::Tensor& x, const at::Tensor& adapter_index, const at::Tensor& w_down, const at::Tensor& w_up,
    const std::optional<at::Tensor>& b_down, const std::optional<at::Tensor>& b_up, c10::string_view activation,
    const at::Tensor& scales, double dropout_p, int64_t seed, const std::optional<at::Tensor>& residual) {
  const Dims dims = check_stacked(kForward, x, w_down, b_down, w_up, b_up, scales);
  check_dropout(kForward, dropout_p);
  const int64_t adapters = w_down.size(0);
  const Segments seg = sort_rows(kForward, adapter_index, dims.n, adapters);
  const at::ScalarType dtype = x.scalar_type();
  const at::ScalarType acc = accumulation_type(dtype);

  ForwardOperands op{dims,
                     adapters,
                     x,
                     w_down,
                     w_up,
                     operand_bias(b_down, dtype),
                     operand_bias(b_up, dtype),
                     std::nullopt,
                     scale_values(scales, dropout_p),
                     parse_activation(std::string(activation)),
                     dropout_p,
                     static_cast<uint64_t>(seed)};
  op.residual = residual_operand(kForward, residual, dims, acc);

  at::Tensor y = empty_output({dims.n, dims.d}, x.options());
  at::Tensor h = at::empty({dims.n, dims.r}, x.options().dtype(acc));
  if (dims.n == 0) return {y, h};
  const BrgemmLayout layout = brgemm_layout(dtype);
  dispatch_dtype(dtype, [&](auto t, auto a) {
    using T = decltype(t);
    using acc_t = decltype(a);
    if constexpr (sizeof(T) == 2) {
      if (layout != BrgemmLayout::none) {
        forward_blocks_brgemm<T>(op, layout, seg, y, h);
        return plain_rows<T, acc_t>(op, seg, y, h);
      }
    }
    forward_blocks<T, acc_t>(op, seg, y, h);
    plain_rows<T, acc_t>(op, seg, y, h);
  });
  return {y, h};
}

}  // namespace adapterfast::cpu
