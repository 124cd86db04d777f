// The fused forward on CPU:
//     h = x Wd^T + bd                                    (returned, [N, r], saved for backward)
//     y = res + scale * keep / (1 - p) * (act(h) Wu^T + bu)
// Rows are processed in blocks of kBlockRows (fewer where a call has few blocks per thread:
// forward_block_rows), in parallel over blocks. Per block, x is read from
// memory once (project_in) and y written once (project_out, with bias, dropout, scale and
// residual applied to each tile as it leaves the registers), so no [N, d] temporary exists.
// A call of up to given_forward_max_rows rows (forward_given) reads the weights as given (in x's
// dtype) instead of converting both into transposed copies first.
#include "adapter_ops.h"

#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "activations.h"
#include "adapter_common.h"
#include "adapter_operands.h"
#include "adapter_brgemm.h"
#include "parallel_tasks.h"
#include "philox.h"
#include "scratch.h"

namespace adapterfast::cpu {
namespace {

// h += b_down, then a = act(h) rounded to x's dtype: m bottleneck rows.
template <typename T, typename acc_t>
void bottleneck_rows(const ForwardOperands& op, int64_t m, acc_t* h, acc_t* a) {
  const int64_t r = op.dims.r;
  if (op.b_down) {
    const acc_t* b_down = op.b_down->data_ptr<acc_t>();
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < r; ++j) h[i * r + j] += b_down[j];
    }
  }
  visit<acc_t>(op.activation, [&](auto f) {
    for (int64_t idx = 0; idx < m * r; ++idx) a[idx] = f.value(h[idx]);
  });
  round_row_as<T>(a, acc_t(1), m * r);
}

// The residual of e for rows from row0: the separate residual, or x itself (xb, the rows as the
// kernels read them, in cache).
template <typename acc_t>
void set_residual(const ForwardOperands& op, int64_t row0, const void* xb, Kind x_kind, int64_t ld_x,
                  OutputEpilogue<acc_t>& e) {
  if (op.residual) {
    e.res = static_cast<const char*>(op.residual->data_ptr()) + row0 * op.residual->stride(0) * op.residual->element_size();
  } else {
    e.res = xb;
    e.res_kind = x_kind;
    e.ld_res = ld_x;
  }
}

template <typename T, typename acc_t>
void forward_blocks(const ForwardOperands& op, at::Tensor& y, at::Tensor& h) {
  const BlockKernels<acc_t>& kernels = block_kernels<acc_t>();
  const auto [n, d, r] = op.dims;
  const RowReader<T, acc_t> x_rows(op.x);
  const acc_t* w_down_t = op.w_down_t.data_ptr<acc_t>();
  const acc_t* w_up_t = op.w_up_t.data_ptr<acc_t>();
  acc_t* h_data = h.data_ptr<acc_t>();
  T* y_data = y.data_ptr<T>();
  const bool dropout = op.dropout_p > 0.0;
  const uint32_t threshold = philox::threshold(op.dropout_p);
  const int64_t ld_keep = keep_row_bytes(d);

  const OutputEpilogue<acc_t> epilogue = forward_epilogue<acc_t>(op, y);

  // BLAS's products of a row depend on its block's rows: blocks of fixed rows, whatever the threads.
  const int64_t rows =
      kernels.nt_at_full_speed ? blas_block_rows(op.dims) : forward_block_rows(n, /*granule=*/8, kMinForwardRowsPerThread);
  const int64_t blocks = (n + rows - 1) / rows;
  parallel_tasks(blocks, [&](TaskQueue& tasks) {
    Scratch<acc_t> x_scratch(x_rows.as_stored() ? 0 : rows * d);
    Scratch<acc_t> a(rows * r);
    Scratch<uint8_t> keep(dropout ? rows * ld_keep : 0);
    OutputEpilogue<acc_t> e = epilogue;
    for (int64_t block = tasks.next(); block >= 0; block = tasks.next()) {
      const int64_t row0 = block * rows;
      const int64_t m = std::min(rows, n - row0);
      // The block's x rows, and where the residual x is read back from (cache) by the epilogue.
      const void* xb = x_rows.stored(row0);
      Kind xb_kind = x_rows.kind();
      int64_t ld_x = x_rows.ld();
      acc_t* hb = h_data + row0 * r;
      if (!x_rows.as_stored()) {
        xb = x_rows.gathered(row0, m, x_scratch.data());
        xb_kind = kAccKind<acc_t>;
        ld_x = d;
      }
      kernels.project_in_stored(m, r, d, xb, xb_kind, ld_x, w_down_t, r, hb, r);
      bottleneck_rows<T>(op, m, hb, a.data());

      if (dropout) kernels.dropout_keep(op.seed, threshold, row0, m, d, keep.data(), ld_keep);
      e.keep = dropout ? keep.data() : nullptr;
      set_residual(op, row0, xb, xb_kind, ld_x, e);
      e.out = y_data + row0 * d;
      kernels.project_out(m, r, d, a.data(), r, w_up_t, d, e);
    }
  });
}

// The forward of a call of up to given_forward_max_rows rows, one block, from the weights as given
// (in x's dtype: weight_in_x_dtype): h's columns by project_nt from rows of Wd (or its rows, on
// kernels whose project_nt computes a row from that row alone: nt_by_rows_max_cols), then y's columns,
// each kGivenPanelCols of them by project_out from a panel of Wu^T widened and transposed in L1
// just before (the same products in the same order as from a transposed copy), or, in a call of
// a few rows (forward_out_by_dots) or on kernels with nt_at_full_speed (BLAS), by project_out_nt
// from the panel's rows of Wu as they are.
// Both go over the threads by columns (h by rows on such kernels), which leaves every element's
// arithmetic as it is: bitwise the same results for any thread count.
template <typename T, typename acc_t>
void forward_given(const ForwardOperands& op, at::Tensor& y, at::Tensor& h) {
  const BlockKernels<acc_t>& kernels = block_kernels<acc_t>();
  const auto [n, d, r] = op.dims;
  const RowReader<T, acc_t> x_rows(op.x);
  const Kind w_kind = kind_of(op.w_down_given.scalar_type());
  const int64_t w_bytes = kind_bytes(w_kind);
  const char* w_down = static_cast<const char*>(op.w_down_given.data_ptr());
  const char* w_up = static_cast<const char*>(op.w_up_given.data_ptr());
  acc_t* h_data = h.data_ptr<acc_t>();
  const bool spread = n * d * r >= kGivenSpreadFmas;

  Scratch<acc_t> x_scratch(x_rows.as_stored() ? 0 : n * d);
  const void* xb = x_rows.as_stored() ? static_cast<const void*>(x_rows.stored(0)) : x_rows.gathered(0, n, x_scratch.data());
  const Kind x_kind = x_rows.as_stored() ? x_rows.kind() : kAccKind<acc_t>;
  const int64_t ld_x = x_rows.as_stored() ? x_rows.ld() : d;

  if (spread && r <= kernels.nt_by_rows_max_cols) {
    const int64_t x_bytes = kind_bytes(x_kind);
    const int64_t unit = kernels.nt_by_rows_min_rows;
    const int64_t units = std::max<int64_t>(1, n / unit);
    at::parallel_for(0, units, (kGivenRowGrain + unit - 1) / unit, [&](int64_t u0, int64_t u1) {
      const int64_t i0 = u0 * unit, i1 = u1 == units ? n : u1 * unit;
      kernels.project_nt(i1 - i0, r, d, static_cast<const char*>(xb) + i0 * ld_x * x_bytes, x_kind, ld_x, w_down,
                         w_kind, d, h_data + i0 * r, r);
    });
  } else {
    by_column_slices(r, spread, kernels.nt_at_full_speed, [&](int64_t j0, int64_t j1) {
      kernels.project_nt(n, j1 - j0, d, xb, x_kind, ld_x, w_down + j0 * d * w_bytes, w_kind, d, h_data + j0, r);
    });
  }
  Scratch<acc_t> a(n * r);
  bottleneck_rows<T>(op, n, h_data, a.data());

  OutputEpilogue<acc_t> e = forward_epilogue<acc_t>(op, y);
  Scratch<uint8_t> keep(op.dropout_p > 0.0 ? n * e.ld_keep : 0);
  if (op.dropout_p > 0.0) {
    kernels.dropout_keep(op.seed, philox::threshold(op.dropout_p), 0, n, d, keep.data(), e.ld_keep);
    e.keep = keep.data();
  }
  set_residual(op, 0, xb, x_kind, ld_x, e);
  e.out = y.data_ptr();
  const bool by_dots = kernels.nt_at_full_speed || forward_out_by_dots(op.dims);
  // On BLAS, fixed panels (no product's shape depends on the thread count) of one sgemm call each.
  const int64_t panel_cols = kernels.nt_at_full_speed ? blas::kOutCols : kGivenPanelCols;
  const int64_t panels = (d + panel_cols - 1) / panel_cols;
  at::parallel_for(0, panels, spread ? 1 : panels, [&](int64_t p0, int64_t p1) {
    Scratch<acc_t> panel(by_dots ? 0 : r * panel_cols);
    for (int64_t k0 = p0 * panel_cols; k0 < std::min(d, p1 * panel_cols); k0 += panel_cols) {
      const int64_t kc = std::min(panel_cols, d - k0);
      if (by_dots) {
        kernels.project_out_nt(n, r, kc, a.data(), r, w_up + k0 * r * w_bytes, w_kind, r, e.from_column(k0));
      } else {
        kernels.widen_transposed(kc, r, w_up + k0 * r * w_bytes, w_kind, r, panel.data());
        kernels.project_out(n, r, kc, a.data(), r, panel.data(), kc, e.from_column(k0));
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> adapter_forward_as(
    const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_up,
    const std::optional<at::Tensor>& b_down, const std::optional<at::Tensor>& b_up,
    c10::string_view activation, double scale, double dropout_p, int64_t seed,
    const std::optional<at::Tensor>& residual, bool training) {
  constexpr const char* kOp = "adapterfast_cpu::forward";
  const Dims dims = check_operands(kOp, x, w_down, b_down, w_up, b_up);
  check_dropout(kOp, dropout_p);
  const at::ScalarType dtype = x.scalar_type();
  const at::ScalarType acc = accumulation_type(dtype);

  const BrgemmLayout layout = brgemm_layout_for(dtype, dims, /*backward=*/false);
  const bool nt_fast =
      acc == at::kFloat ? block_kernels<float>().nt_at_full_speed : block_kernels<double>().nt_at_full_speed;
  const bool given = layout == BrgemmLayout::none ? dims.n <= given_forward_max_rows(dims, nt_fast)
                                                  : packs_given_weights(layout, dtype, w_down, w_up, dims, false);
  const auto [w_down_t, w_up_t] =
      given ? std::pair<at::Tensor, at::Tensor>() : operand_weights(w_down, w_up, dtype, /*transpose=*/true, dims);
  ForwardOperands op{dims,
                     x,
                     w_down_t,
                     w_up_t,
                     operand_bias(b_down, dtype),
                     operand_bias(b_up, dtype),
                     residual_operand(kOp, residual, dims, acc),
                     parse_activation(std::string(activation)),
                     scale,
                     dropout_p,
                     static_cast<uint64_t>(seed),
                     training};
  if (given) {
    op.w_down_given = weight_in_x_dtype(w_down, dtype);
    op.w_up_given = weight_in_x_dtype(w_up, dtype);
  }

  at::Tensor y = empty_output({dims.n, dims.d}, x.options());
  at::Tensor h = at::empty({dims.n, dims.r}, x.options().dtype(acc));
  if (dims.n == 0) return {y, h};
  dispatch_dtype(dtype, [&](auto t, auto a) {
    using T = decltype(t);
    using acc_t = decltype(a);
    if constexpr (std::is_same_v<acc_t, float>) {
      if (layout != BrgemmLayout::none) return forward_blocks_brgemm<T>(op, layout, y, h);
    }
    if (given) return forward_given<T, acc_t>(op, y, h);
    forward_blocks<T, acc_t>(op, y, h);
  });
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor> adapter_forward(
    const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_up,
    const std::optional<at::Tensor>& b_down, const std::optional<at::Tensor>& b_up,
    c10::string_view activation, double scale, double dropout_p, int64_t seed,
    const std::optional<at::Tensor>& residual) {
  return adapter_forward_as(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual,
                            /*training=*/false);
}

}  // namespace adapterfast::cpu
