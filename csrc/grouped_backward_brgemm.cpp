// The grouped backward for 16-bit inputs on brgemm (grouped_backward.h). Per block of one
// adapter's rows, as the single-adapter op's 16-bit driver (adapter_brgemm.cpp) does on
// contiguous rows, reading the block's g and x rows where they lie through its row list (no
// gather into scratch; each row's successor in the next block is prefetched into L2):
//   gz = round(g * keep * s) with dropout (db_up sums it unrounded), else gz = g, with s folded
//   into dh and applied to the group's dw_up and db_up once at its end (as the single-adapter op);
//   da = gz Wu (brgemm, K = d);  dh = s' da act'(h) (db_down sums it);  a = act(h);
//   dx = dh Wd (brgemm, K = r) + g, finished straight into its rows of dx (the epilogue's row list);
//   and per run of up to kSumRows rows of the group, dw_up^T += a^T gz and dw_down += dh^T x
//   (brgemm, K = the run's rows, the gz rows and x's listed rows repacked in brgemm's B layout).
// Contractions over an odd length are padded with one zero (brgemm's 16-bit layouts pair K).
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "dx_epilogue.h"
#include "grouped_backward.h"
#include "grouped_brgemm_columns.h"
#include "philox.h"

namespace adapterfast::cpu::grouped {
namespace {

using at::native::cpublas::brgemm;
using at::native::cpublas::brgemm_release;

// Rows per weight-gradient brgemm call (a multiple of kBlockRows).
constexpr int64_t kSumRows = 4 * kBlockRows;

}  // namespace

template <typename T>
void backward_blocks_brgemm(const BackwardOperands& op, BrgemmLayout layout, const Segments& seg,
                            const std::vector<Group>& groups, at::Tensor& dx, at::Tensor& partials) {
  const auto [n, d, r] = op.dims;
  const int64_t rp = even(r);
  const int64_t dp = even(d);
  const bool vnni = layout == BrgemmLayout::vnni;
  const std::vector<int64_t> used = seg.used();
  const T* w_up_b = packed_operand<T>(layout, op.w_up, /*transpose=*/false, used, 0);      // [A][dp, r]
  const T* w_down_b = packed_operand<T>(layout, op.w_down, /*transpose=*/false, used, 1);  // [A][rp, d]
  const float* h_data = op.h.data_ptr<float>();
  const T* g_data = op.grad_y.data_ptr<T>();  // contiguous
  const at::Tensor x = with_unit_column_stride(op.x);
  const T* x_data = x.data_ptr<T>();
  const int64_t ld_x = x.stride(0);
  T* dx_data = dx.data_ptr<T>();
  const int64_t sorted_end = seg.offsets.back();
  const bool dropout = op.dropout_p > 0.0;
  const uint32_t threshold = philox::threshold(op.dropout_p);
  const int64_t ld_keep = keep_row_bytes(d);
  const BlockKernels<float>& kernels = block_kernels<float>();

  OutputEpilogue<float> epilogue = dx_epilogue<float>(op.grad_y, d, dx);
  epilogue.out = dx_data;

  at::parallel_for(0, static_cast<int64_t>(groups.size()), 1, [&](int64_t first, int64_t last) {
    std::vector<T> gz(kBlockRows * dp, T(0.0f));
    std::vector<T> gz_b(kSumRows * d);  // a run's gz rows as a B operand
    std::vector<T> x_b(kSumRows * d);   // a run's x rows as a B operand
    std::vector<T> a_t(r * kSumRows);   // [r, kSumRows]: a^T of the run
    std::vector<T> dh_t(r * kSumRows);  // [r, kSumRows]: dh^T of the run
    std::vector<float> da(kBlockRows * r);
    std::vector<T> dh(kBlockRows * rp, T(0.0f));
    std::vector<float> chunk(kBlockRows * kOutCols);
    std::vector<uint8_t> keep(dropout ? ld_keep : 0);
    OutputEpilogue<float> e = epilogue;
    for (int64_t gi = first; gi < last; ++gi) {
      const Group& group = groups[gi];
      const int64_t adapter = group.adapter;
      const float factor = static_cast<float>(op.scales[adapter]);
      const float fold = dropout ? 1.0f : factor;
      float* row = partials.data_ptr<float>() + gi * partials.size(1);
      std::fill(row, row + partials.size(1), 0.0f);
      const Partials<float> sums(row, op.dims);
      const T* w_up = w_up_b + adapter * dp * r;
      const T* w_down = w_down_b + adapter * rp * d;
      int64_t run = 0;  // rows (even) collected for the weight gradients
      for (size_t bi = 0; bi < group.blocks.size(); ++bi) {
        const Block& block = group.blocks[bi];
        const int64_t m = block.end - block.begin;
        const int64_t mp = even(m);
        const int64_t* rows = seg.order.data() + block.begin;
        const int64_t ahead = sorted_end - block.begin;

        for (int64_t i = 0; i < m; ++i) {
          if (i + kPrefetchAhead < ahead) {
            prefetch_bytes(reinterpret_cast<const char*>(g_data + rows[i + kPrefetchAhead] * d), d * sizeof(T));
          }
          const uint8_t* __restrict kp = nullptr;
          if (dropout) {
            kernels.dropout_keep(op.seed, threshold, rows[i], 1, d, keep.data(), ld_keep);
            kp = keep.data();
          }
          const T* __restrict g = g_data + rows[i] * d;
          T* __restrict out = gz.data() + i * dp;
          float* __restrict sum = sums.db_up;
          if (!dropout) {
            std::copy(g, g + d, out);
            add_to_sums(g, sum, d);
            continue;
          }
          for (int64_t k = 0; k < d; ++k) {
            const float v = static_cast<float>(g[k]) * (kp == nullptr || kp[k] ? factor : 0.0f);
            sum[k] += v;
            out[k] = static_cast<T>(v);
          }
        }

        brgemm(m, r, dp, dp, r, r, false, gz.data(), w_up, da.data(), vnni);
        for (int64_t i = 0; i < m && i + kPrefetchAhead < ahead; ++i) {
          prefetch_bytes(reinterpret_cast<const char*>(h_data + rows[i + kPrefetchAhead] * r), r * sizeof(float));
        }
        visit<float>(op.activation, [&](auto f) {
          for (int64_t i = 0; i < mp; ++i) {
            const float* hb = h_data + (i < m ? rows[i] : 0) * r;
            for (int64_t j = 0; j < r; ++j) {
              T dh_value(0.0f);
              T a_value(0.0f);
              if (i < m) {
                const float v = fold * backprop(f, hb[j], da[i * r + j]);
                sums.db_down[j] += v;
                dh_value = static_cast<T>(v);
                a_value = static_cast<T>(f.value(hb[j]));
                dh[i * rp + j] = dh_value;
              }
              dh_t[j * kSumRows + run + i] = dh_value;
              a_t[j * kSumRows + run + i] = a_value;
            }
          }
        });

        e.res = op.residual_is_x ? g_data : nullptr;
        e.res_rows = rows;
        e.out_rows = rows;
        finish_by_columns<T>(layout, m, rp, d, dh.data(), rp, w_down, chunk.data(), e);

        rows_as_b<T>(layout, m, d, gz.data(), dp, gz_b.data() + run * d);
        for (int64_t i = 0; i < m && i + kPrefetchAhead < ahead; ++i) {
          prefetch_bytes(reinterpret_cast<const char*>(x_data + rows[i + kPrefetchAhead] * ld_x), d * sizeof(T));
        }
        rows_as_b<T>(layout, m, d, x_data, ld_x, x_b.data() + run * d, rows);
        run += mp;
        if (run == kSumRows || bi + 1 == group.blocks.size()) {
          accumulate_by_columns<T>(layout, r, run, d, a_t.data(), kSumRows, gz_b.data(), sums.dw_up_t);
          accumulate_by_columns<T>(layout, r, run, d, dh_t.data(), kSumRows, x_b.data(), sums.dw_down);
          run = 0;
        }
      }
      if (fold != 1.0f) {
        for (int64_t k = 0; k < r * d; ++k) sums.dw_up_t[k] *= fold;
        for (int64_t k = 0; k < d; ++k) sums.db_up[k] *= fold;
      }
    }
    store_fence();
    brgemm_release(vnni);
  });
}

template void backward_blocks_brgemm<c10::BFloat16>(const BackwardOperands&, BrgemmLayout, const Segments&,
                                                    const std::vector<Group>&, at::Tensor&, at::Tensor&);
template void backward_blocks_brgemm<c10::Half>(const BackwardOperands&, BrgemmLayout, const Segments&,
                                                const std::vector<Group>&, at::Tensor&, at::Tensor&);

}  // namespace adapterfast::cpu::grouped
