// The grouped backward for 16-bit inputs on brgemm (grouped_backward.h). Per block of one
// adapter's rows, as the single-adapter op's 16-bit driver (adapter_brgemm.cpp) does on
// contiguous rows, reading the block's g and x rows where they lie through its row list (no
// gather into scratch; each row's successor in the next block is prefetched into L2):
//   gz = round(g * keep * s) with dropout (db_up sums it unrounded), else gz = g, with s folded
//   into dh and applied to the group's dw_up and db_up once at its end (as the single-adapter op);
//   da = gz Wu (brgemm, K = d);  dh = s' da act'(h) (db_down sums it);  a = act(h);
//   dx = dh Wd (brgemm, K = r) + g, finished straight into its rows of dx (the epilogue's row list,
//   non-temporal stores from kScatteredStreamBytes);
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
#include "parallel_tasks.h"
#include "philox.h"
#include "scratch.h"

namespace adapterfast::cpu::grouped {
namespace {

using at::native::cpublas::brgemm;
using at::native::cpublas::brgemm_release;

// Rows per weight-gradient brgemm call (a multiple of kBlockRows), and the most a run holds: a
// group's last, partial block joins the run before it when it fits, instead of being summed
// alone (with rows randomly spread over 32 adapters, about half of the groups end in a short
// block; each lone run cost six more brgemm calls and tile reconfigurations).
constexpr int64_t kSumRows = 4 * kBlockRows;
constexpr int64_t kRunRows = kSumRows + kBlockRows;

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
  epilogue.stream_out = dx.nbytes() >= kScatteredStreamBytes;

  parallel_tasks(static_cast<int64_t>(groups.size()), [&](TaskQueue& tasks) {
    Scratch<T> gz = Scratch<T>::zeroed(kBlockRows * dp);
    Scratch<T> gz_b(kRunRows * d);  // a run's gz rows as a B operand
    Scratch<T> x_b(kRunRows * d);   // a run's x rows as a B operand
    Scratch<T> a_t(r * kRunRows);   // [r, kRunRows]: a^T of the run
    Scratch<T> dh_t(r * kRunRows);  // [r, kRunRows]: dh^T of the run
    Scratch<float> da(kBlockRows * r);
    Scratch<T> dh = Scratch<T>::zeroed(kBlockRows * rp);
    Scratch<T> a(kBlockRows * r);
    Scratch<float> chunk(kBlockRows * kOutCols);
    Scratch<uint8_t> keep(dropout ? ld_keep : 0);
    OutputEpilogue<float> e = epilogue;
    for (int64_t gi = tasks.next(); gi >= 0; gi = tasks.next()) {
      const Group& group = groups[gi];
      const int64_t adapter = group.adapter;
      const float factor = static_cast<float>(op.scales[adapter]);
      const float fold = dropout ? 1.0f : factor;
      float* row = partials.data_ptr<float>() + gi * partials.size(1);
      const Partials<float> sums(row, op.dims);
      // The weight-gradient sums start with the group's first run (every group has one); only
      // the bias sums are zeroed.
      std::fill(sums.db_up, sums.db_up + d, 0.0f);
      std::fill(sums.db_down, sums.db_down + r, 0.0f);
      bool first_run = true;
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
          for (int64_t i = 0; i < m; ++i) {
            const float* __restrict hb = h_data + rows[i] * r;
            const float* __restrict da_row = da.data() + i * r;
            T* __restrict dh_row = dh.data() + i * rp;
            T* __restrict a_row = a.data() + i * r;
            float* __restrict sum = sums.db_down;
            for (int64_t j = 0; j < r; ++j) {
              const float v = fold * backprop(f, hb[j], da_row[j]);
              sum[j] += v;
              dh_row[j] = static_cast<T>(v);
              a_row[j] = static_cast<T>(f.value(hb[j]));
            }
          }
        });
        // dh^T and a^T of the run's rows (a zero column pads an odd m): the A operands of the
        // weight-gradient products, taken as a separate transpose so that the loop above runs
        // over contiguous rows.
        transpose_rows(m, r, dh.data(), rp, dh_t.data() + run, kRunRows);
        transpose_rows(m, r, a.data(), r, a_t.data() + run, kRunRows);
        if (mp != m) {
          for (int64_t j = 0; j < r; ++j) dh_t[j * kRunRows + run + m] = a_t[j * kRunRows + run + m] = T(0.0f);
        }

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
        const size_t left = group.blocks.size() - bi - 1;  // blocks after this one
        const bool tail_joins = left == 1 && run + even(group.blocks.back().end - group.blocks.back().begin) <= kRunRows;
        if (left == 0 || (run >= kSumRows && !tail_joins)) {
          accumulate_by_columns<T>(layout, r, run, d, a_t.data(), kRunRows, gz_b.data(), sums.dw_up_t, !first_run);
          accumulate_by_columns<T>(layout, r, run, d, dh_t.data(), kRunRows, x_b.data(), sums.dw_down, !first_run);
          run = 0;
          first_run = false;
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
