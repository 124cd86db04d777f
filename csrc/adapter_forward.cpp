// The fused forward on CPU:
//     h = x Wd^T + bd                                    (returned, [N, r], saved for backward)
//     y = res + scale * keep / (1 - p) * (act(h) Wu^T + bu)
// Rows are processed in blocks of kBlockRows (fewer where a call has few blocks per thread:
// forward_block_rows), in parallel over blocks. Per block, x is read from
// memory once (project_in) and y written once (project_out, with bias, dropout, scale and
// residual applied to each tile as it leaves the registers), so no [N, d] temporary exists.
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

template <typename T, typename acc_t>
void forward_blocks(const ForwardOperands& op, at::Tensor& y, at::Tensor& h) {
  const BlockKernels<acc_t>& kernels = block_kernels<acc_t>();
  const auto [n, d, r] = op.dims;
  const RowReader<T, acc_t> x_rows(op.x);
  const acc_t* w_down_t = op.w_down_t.data_ptr<acc_t>();
  const acc_t* w_up_t = op.w_up_t.data_ptr<acc_t>();
  const acc_t* b_down = op.b_down ? op.b_down->data_ptr<acc_t>() : nullptr;
  acc_t* h_data = h.data_ptr<acc_t>();
  T* y_data = y.data_ptr<T>();
  const bool dropout = op.dropout_p > 0.0;
  const uint32_t threshold = philox::threshold(op.dropout_p);
  const int64_t ld_keep = keep_row_bytes(d);

  const OutputEpilogue<acc_t> epilogue = forward_epilogue<acc_t>(op, y);

  const int64_t rows = forward_block_rows(n, /*granule=*/8);
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
      if (x_rows.as_stored()) {
        kernels.project_in_stored(m, r, d, xb, xb_kind, ld_x, w_down_t, r, hb, r);
      } else {
        const acc_t* gathered = x_rows.gathered(row0, m, x_scratch.data());
        ld_x = d;
        kernels.project_in(m, r, d, gathered, ld_x, w_down_t, r, hb, r);
        xb = gathered;
        xb_kind = std::is_same_v<acc_t, double> ? Kind::f64 : Kind::f32;
      }
      if (b_down != nullptr) {
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < r; ++j) hb[i * r + j] += b_down[j];
        }
      }
      visit<acc_t>(op.activation, [&](auto f) {
        for (int64_t idx = 0; idx < m * r; ++idx) a[idx] = f.value(hb[idx]);
      });
      round_row_as<T>(a.data(), acc_t(1), m * r);

      if (dropout) kernels.dropout_keep(op.seed, threshold, row0, m, d, keep.data(), ld_keep);
      e.keep = dropout ? keep.data() : nullptr;
      if (op.residual) {
        e.res = static_cast<const char*>(op.residual->data_ptr()) +
                row0 * op.residual->stride(0) * op.residual->element_size();
      } else {
        e.res = xb;
        e.res_kind = xb_kind;
        e.ld_res = ld_x;
      }
      e.out = y_data + row0 * d;
      kernels.project_out(m, r, d, a.data(), r, w_up_t, d, e);
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
  const bool given = packs_given_weights(layout, dtype, w_down, w_up, dims, /*backward=*/false);
  ForwardOperands op{dims,
                     x,
                     given ? at::Tensor() : operand_weight(w_down, dtype, /*transpose=*/true),
                     given ? at::Tensor() : operand_weight(w_up, dtype, /*transpose=*/true),
                     operand_bias(b_down, dtype),
                     operand_bias(b_up, dtype),
                     residual_operand(kOp, residual, dims, acc),
                     parse_activation(std::string(activation)),
                     scale,
                     dropout_p,
                     static_cast<uint64_t>(seed),
                     training};
  if (given) {
    op.w_down_given = w_down.contiguous();
    op.w_up_given = w_up.contiguous();
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
