// The grouped backward on CPU (adapterfast_cpu::grouped_backward); the forward and the row
// segments are described in grouped_forward.cpp and grouped_rows.h.
//
// Chain rule per adapter a over its rows, m the dropout keep-mask, s = scales[a] / (1 - p):
//     gz = g * m * s;   db_up[a] = sum gz;   dw_up[a] = gz^T act(h)
//     dh = (gz Wu[a]) * act'(h);   db_down[a] = sum dh;   dw_down[a] = dh^T x
//     dx = dh Wd[a] (+ g when the residual is x)
// Weight gradients are deterministic: an adapter's blocks are split into a number of contiguous
// groups that depends only on the row counts, each group sums fp32 partials block by block, and
// the groups are summed in order. Adapters without rows get zero gradients.
#include "grouped_ops.h"

#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "activations.h"
#include "adapter_common.h"
#include "dx_epilogue.h"
#include "grouped_backward.h"
#include "grouped_row_kernels.h"
#include "grouped_rows.h"
#include "parallel_tasks.h"
#include "philox.h"
#include "scratch.h"

namespace adapterfast::cpu {
namespace {

using namespace grouped;

constexpr const char* kBackward = "adapterfast_cpu::grouped_backward";
constexpr int64_t kMaxGroupsPerAdapter = 32;

// col_sums[k] += g[k] * factor.
template <typename acc_t>
void add_scaled_row(const acc_t* __restrict g, acc_t factor, int64_t d, acc_t* __restrict col_sums) {
  for (int64_t k = 0; k < d; ++k) col_sums[k] += g[k] * factor;
}

// gz[k] = round(g[k] * factor * keep[k]) (keep null: all kept), col_sums[k] += the unrounded
// value. Restrict-qualified so that it vectorises.
template <typename T, typename acc_t>
void scale_row(const T* __restrict g, const uint8_t* __restrict keep, acc_t factor, int64_t d, acc_t* __restrict gz,
               acc_t* __restrict col_sums) {
  for (int64_t k = 0; k < d; ++k) {
    const acc_t v = static_cast<acc_t>(g[k]) * (keep == nullptr || keep[k] ? factor : acc_t(0));
    col_sums[k] += v;
    gz[k] = round_as<T>(v);
  }
}

// One row of the bottleneck: dh = fold * da * act'(h), summed unrounded into db_down, and dh and
// a = fold * act(h) rounded to T as matmul operands.
template <typename T, typename acc_t, typename Act>
void activation_backward_row(Act f, const acc_t* __restrict h, const acc_t* __restrict da, acc_t fold, int64_t r,
                             acc_t* __restrict dh, acc_t* __restrict a, acc_t* __restrict db_down) {
  for (int64_t j = 0; j < r; ++j) {
    const acc_t value = backprop(f, h[j], fold * da[j]);
    db_down[j] += value;
    dh[j] = value;
    a[j] = f.value(h[j]);
  }
  round_row_as<T>(dh, acc_t(1), r);
  round_row_as<T>(a, fold, r);
}

// Each adapter's blocks split into groups: a power of two per adapter, at most its block count
// and kMaxGroupsPerAdapter, and small enough that all partials stay under a quarter of x's size.
// A function of the row counts only, so the summation order never depends on threads.
std::vector<Group> reduction_groups(const Segments& seg, const Dims& dims, int64_t adapters) {
  int64_t used = 0;
  for (int64_t a = 0; a < adapters; ++a) used += seg.rows(a + 1) > 0;
  const int64_t budget = std::max<int64_t>(1, dims.n * dims.d / 4 / Partials<float>::size(dims));
  const int64_t cap = std::min<int64_t>(kMaxGroupsPerAdapter, std::max<int64_t>(1, budget / std::max<int64_t>(1, used)));
  std::vector<Group> groups;
  for (int64_t a = 0; a < adapters; ++a) {
    const std::vector<Block> blocks = adapter_blocks(seg, a);
    const int64_t nb = static_cast<int64_t>(blocks.size());
    if (nb == 0) continue;
    int64_t count = 1;
    while (count * 2 <= std::min(cap, nb)) count *= 2;
    for (int64_t g = 0; g < count; ++g) {
      groups.push_back({a, std::vector<Block>(blocks.begin() + g * nb / count, blocks.begin() + (g + 1) * nb / count)});
    }
  }
  return groups;
}

// Every group's blocks: dx rows written in place, weight-gradient shares summed into the group's
// partials. Rows of T = acc_t (float32, float64) are read where they lie in grad_y and x, through
// the block's row list (grouped_row_kernels.h); 16-bit rows (where brgemm does not run) are
// gathered into scratch and converted.
template <typename T, typename acc_t>
void backward_blocks(const BackwardOperands& op, const Segments& seg, const std::vector<Group>& groups,
                     at::Tensor& dx, at::Tensor& partials) {
  constexpr bool kRowList = std::is_same_v<T, acc_t>;
  const BlockKernels<acc_t>& kernels = block_kernels<acc_t>();
  const RowKernels<acc_t>& row_kernels = grouped::row_kernels<acc_t>();
  const auto [n, d, r] = op.dims;
  const std::vector<int64_t> used = seg.used();
  const acc_t* w_down = stacked_operand<T, acc_t>(op.w_down, /*transpose=*/false, used, 0);
  const acc_t* w_up = stacked_operand<T, acc_t>(op.w_up, /*transpose=*/false, used, 1);
  const int64_t sorted_end = seg.offsets.back();
  const acc_t* h_data = op.h.data_ptr<acc_t>();
  const T* g_data = op.grad_y.data_ptr<T>();  // contiguous
  const acc_t* x_in_place = nullptr;
  int64_t ld_x = d;
  if constexpr (kRowList) {
    if (op.x.stride(1) == 1 || d == 1) {
      x_in_place = op.x.data_ptr<acc_t>();
      ld_x = op.x.stride(0);
    }
  }
  T* dx_data = dx.data_ptr<T>();
  const bool dropout = op.dropout_p > 0.0;
  const uint32_t threshold = philox::threshold(op.dropout_p);
  const int64_t ld_keep = keep_row_bytes(d);
  OutputEpilogue<acc_t> epilogue = dx_epilogue<acc_t>(op.grad_y, d, dx);
  epilogue.out = dx_data;
  epilogue.stream_out = dx.nbytes() >= kScatteredStreamBytes;

  parallel_tasks(static_cast<int64_t>(groups.size()), [&](TaskQueue& tasks) {
    Scratch<T> gb = Scratch<T>::zeroed(kRowList ? 0 : kBlockRows * d);
    Scratch<acc_t> gz(kRowList && !dropout ? 0 : kBlockRows * d);
    Scratch<acc_t> xb(x_in_place != nullptr ? 0 : kBlockRows * d);
    Scratch<acc_t> hb(kBlockRows * r);
    Scratch<acc_t> da(kBlockRows * r);
    Scratch<acc_t> a(kBlockRows * r);
    Scratch<acc_t> dh(kBlockRows * r);
    Scratch<uint8_t> keep(dropout ? kBlockRows * ld_keep : 0);
    OutputEpilogue<acc_t> e = epilogue;
    for (int64_t gi = tasks.next(); gi >= 0; gi = tasks.next()) {
      const Group& group = groups[gi];
      const int64_t adapter = group.adapter;
      const acc_t factor = static_cast<acc_t>(op.scales[adapter]);
      acc_t* row = partials.data_ptr<acc_t>() + gi * partials.size(1);
      std::fill(row, row + partials.size(1), acc_t(0));
      const Partials<acc_t> sums(row, op.dims);
      for (const Block& block : group.blocks) {
        const int64_t m = block.end - block.begin;
        const int64_t* rows = seg.order.data() + block.begin;
        const int64_t ahead = sorted_end - block.begin;

        // gz = g * keep * s, rounded to x's dtype as a matmul operand; db_up sums it unrounded.
        // Without dropout and with g in the accumulation type, g's rows in place are gz up to the
        // factor s, which is folded into the [rows, r] operands instead (as the single-adapter
        // op does): no gz pass, and db_up sums them once the GEMM has brought them into cache.
        // Then da = gz Wu.
        const bool g_is_gz = kRowList && !dropout;
        const acc_t fold = g_is_gz ? factor : acc_t(1);
        if constexpr (kRowList) {
          if (g_is_gz) {
            row_kernels.project_in_rows(m, r, d, g_data, d, rows, ahead, w_up + adapter * d * r, r, da.data(), r);
            for (int64_t i = 0; i < m; ++i) add_scaled_row(g_data + rows[i] * d, factor, d, sums.db_up);
          }
        }
        if (!g_is_gz) {
          if constexpr (!kRowList) gather_bytes(op.grad_y, rows, m, ahead, reinterpret_cast<char*>(gb.data()));
          for (int64_t i = 0; i < m; ++i) {
            const T* g_row = kRowList ? g_data + rows[i] * d : gb.data() + i * d;
            if (kRowList && i + kPrefetchAhead < ahead) {
              prefetch_bytes(reinterpret_cast<const char*>(g_data + rows[i + kPrefetchAhead] * d), d * sizeof(T));
            }
            const uint8_t* kr = nullptr;
            if (dropout) {
              kr = keep.data() + i * ld_keep;
              kernels.dropout_keep(op.seed, threshold, rows[i], 1, d, keep.data() + i * ld_keep, ld_keep);
            }
            scale_row<T>(g_row, kr, factor, d, gz.data() + i * d, sums.db_up);
          }
          kernels.project_in(m, r, d, gz.data(), d, w_up + adapter * d * r, r, da.data(), r);
        }

        // dh = da * act'(h); a = act(h) from the saved pre-activation.
        for (int64_t i = 0; i < m; ++i) {
          if (i + kPrefetchAhead < ahead) {
            prefetch_bytes(reinterpret_cast<const char*>(h_data + rows[i + kPrefetchAhead] * r), r * sizeof(acc_t));
          }
          std::memcpy(hb.data() + i * r, h_data + rows[i] * r, r * sizeof(acc_t));
        }
        visit<acc_t>(op.activation, [&](auto f) {
          for (int64_t i = 0; i < m; ++i) {
            activation_backward_row<T>(f, hb.data() + i * r, da.data() + i * r, fold, r, dh.data() + i * r,
                                       a.data() + i * r, sums.db_down);
          }
        });

        // dw_up^T += a^T gz, dw_down += dh^T x.
        if constexpr (kRowList) {
          if (g_is_gz) {
            row_kernels.accumulate_outer_rows(m, r, d, a.data(), r, g_data, d, rows, ahead, sums.dw_up_t, d);
          }
        }
        if (!g_is_gz) kernels.accumulate_outer(m, r, d, a.data(), r, gz.data(), d, sums.dw_up_t, d);
        if (x_in_place != nullptr) {
          row_kernels.accumulate_outer_rows(m, r, d, dh.data(), r, x_in_place, ld_x, rows, ahead, sums.dw_down, d);
        } else {
          gather_rows<T, acc_t>(op.x, rows, m, ahead, xb.data(), d);
          kernels.accumulate_outer(m, r, d, dh.data(), r, xb.data(), d, sums.dw_down, d);
        }

        // dx = dh Wd (+ g, read in place or from the gathered rows).
        e.res = !op.residual_is_x ? nullptr : kRowList ? static_cast<const void*>(g_data) : gb.data();
        e.res_rows = kRowList ? rows : nullptr;
        e.out_rows = rows;
        kernels.project_out(m, r, d, dh.data(), r, w_down + adapter * r * d, d, e);
      }
    }
    store_fence();
  });
}

// dx = g (residual x) or 0 on the rows without an adapter.
template <typename T>
void plain_rows(const BackwardOperands& op, const Segments& seg, at::Tensor& dx) {
  const int64_t plain = seg.rows(0);
  if (plain > 0) {
    copy_plain_rows<T>(op.residual_is_x ? std::optional<at::Tensor>(op.grad_y) : std::nullopt, seg.order.data(), plain,
                       op.dims.d, dx.data_ptr<T>());
  }
}

// dst[k] = src[k] rounded to U (to nearest even, as Tensor.to does). For bfloat16 from float the
// rounding is spelled out on the bits so that the loop vectorises (c10::BFloat16's conversion
// does not; 0.8 M scalar conversions cost ~0.8 ms at A = 32); NaN becomes bfloat16's quiet NaN,
// as there.
template <typename U, typename acc_t>
void round_into(const acc_t* __restrict src, int64_t count, U* __restrict dst) {
  if constexpr (std::is_same_v<U, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    uint16_t* __restrict out = reinterpret_cast<uint16_t*>(dst);
    for (int64_t k = 0; k < count; ++k) {
      uint32_t u;
      std::memcpy(&u, src + k, sizeof(u));
      const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
      out[k] = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
    }
  } else {
    for (int64_t k = 0; k < count; ++k) dst[k] = static_cast<U>(src[k]);
  }
}

// The stacked gradients in the weights' dtypes, written straight from the group partials (no
// [A, size] totals tensor with a transposed copy and a conversion after it: at A = 32 those passes
// were ~1.3 ms of a ~17 ms bf16 backward, measured with perf): each used adapter's groups are
// summed in group order into an fp32/fp64 row (an adapter of one group, the usual case at many
// adapters, is rounded from its partials row as it is), which is rounded once into dw_down[a],
// db_down[a], dw_up[a] (transposed from dw_up^T) and db_up[a]. Unused adapters get zeros. With
// `tiles` (the 16-bit brgemm drivers ran, so AVX-512 is in use), 16-bit dw_up^T is transposed by
// 16 x 16 tiles (transpose_rows, brgemm.h): the scalar transpose and the sum of a single group
// into a copy were ~70% of this pass's samples (perf, bf16, A = 32, N = 8192, 1 thread).
template <typename acc_t>
void write_gradients(const at::Tensor& partials, const std::vector<Group>& groups, const Dims& dims, bool tiles,
                     at::Tensor& dw_down, at::Tensor& db_down, at::Tensor& dw_up, at::Tensor& db_up) {
  const auto [n, d, r] = dims;
  const int64_t size = partials.size(1);
  const int64_t adapters = dw_down.size(0);
  std::vector<int64_t> first(adapters + 1, static_cast<int64_t>(groups.size()));
  for (int64_t g = static_cast<int64_t>(groups.size()) - 1; g >= 0; --g) first[groups[g].adapter] = g;
  for (int64_t a = adapters - 1; a >= 0; --a) first[a] = std::min(first[a], first[a + 1]);
  acc_t* src = partials.data_ptr<acc_t>();
  auto write = [&](auto down_tag, auto up_tag) {
    using D = decltype(down_tag);
    using U = decltype(up_tag);
    D* wd = dw_down.data_ptr<D>();
    D* bd = db_down.data_ptr<D>();
    U* wu = dw_up.data_ptr<U>();
    U* bu = db_up.data_ptr<U>();
    at::parallel_for(0, adapters, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> total(size);
      Scratch<U> up_t = Scratch<U>::zeroed(r * d);  // dw_up^T [r, d] rounded, before its transpose
      for (int64_t a = begin; a < end; ++a) {
        if (first[a] == first[a + 1]) {
          std::fill(wd + a * r * d, wd + (a + 1) * r * d, D(0));
          std::fill(bd + a * r, bd + (a + 1) * r, D(0));
          std::fill(wu + a * d * r, wu + (a + 1) * d * r, U(0));
          std::fill(bu + a * d, bu + (a + 1) * d, U(0));
          continue;
        }
        acc_t* sums_row = src + first[a] * size;
        if (first[a + 1] - first[a] > 1) {
          std::fill(total.begin(), total.end(), acc_t(0));
          for (int64_t g = first[a]; g < first[a + 1]; ++g) {
            const acc_t* __restrict part = src + g * size;
            acc_t* __restrict t = total.data();
            for (int64_t k = 0; k < size; ++k) t[k] += part[k];
          }
          sums_row = total.data();
        }
        const Partials<acc_t> sums(sums_row, dims);
        round_into(sums.dw_up_t, r * d, up_t.data());
        U* __restrict wu_a = wu + a * d * r;
        if (tiles) {
          transpose_rows(r, d, up_t.data(), d, wu_a, r);
        } else {
          for (int64_t k = 0; k < d; ++k) {
            for (int64_t j = 0; j < r; ++j) wu_a[k * r + j] = up_t[j * d + k];
          }
        }
        round_into(sums.dw_down, r * d, wd + a * r * d);
        round_into(sums.db_up, d, bu + a * d);
        round_into(sums.db_down, r, bd + a * r);
      }
    });
  };
  dispatch_weight(dw_down.scalar_type(), [&](auto down_tag) {
    dispatch_weight(dw_up.scalar_type(), [&](auto up_tag) { write(down_tag, up_tag); });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& adapter_index, const at::Tensor& w_down,
    const at::Tensor& w_up, const std::optional<at::Tensor>& b_down, const std::optional<at::Tensor>& b_up,
    const at::Tensor& h, c10::string_view activation, const at::Tensor& scales, double dropout_p, int64_t seed,
    bool residual_is_x) {
  const Dims dims = check_stacked(kBackward, x, w_down, b_down, w_up, b_up, scales);
  check_dropout(kBackward, dropout_p);
  check_like_x(kBackward, "grad_y", grad_y, dims);
  const at::ScalarType dtype = x.scalar_type();
  const at::ScalarType acc = accumulation_type(dtype);
  TORCH_CHECK_TYPE(grad_y.scalar_type() == dtype, kBackward, ": grad_y must have x's dtype ", dtype, ", got ",
                   grad_y.scalar_type());
  TORCH_CHECK_VALUE(h.dim() == 2 && h.size(0) == dims.n && h.size(1) == dims.r, kBackward, ": h must be [", dims.n,
                    ", ", dims.r, "], got ", h.sizes());
  const int64_t adapters = w_down.size(0);
  const Segments seg = sort_rows(kBackward, adapter_index, dims.n, adapters);
  const std::vector<Group> groups = reduction_groups(seg, dims, adapters);

  const BackwardOperands op{dims,
                            adapters,
                            grad_y.contiguous(),
                            x,
                            w_down,
                            w_up,
                            h.to(acc).contiguous(),
                            scale_values(scales, dropout_p),
                            residual_is_x,
                            parse_activation(std::string(activation)),
                            dropout_p,
                            static_cast<uint64_t>(seed)};

  at::Tensor dx = empty_output({dims.n, dims.d}, x.options());
  const int64_t size = Partials<float>::size(dims);
  const auto down_options = x.options().dtype(w_down.scalar_type());
  const auto up_options = x.options().dtype(w_up.scalar_type());
  at::Tensor dw_down = at::empty({adapters, dims.r, dims.d}, down_options);
  at::Tensor db_down = at::empty({adapters, dims.r}, down_options);
  at::Tensor dw_up = at::empty({adapters, dims.d, dims.r}, up_options);
  at::Tensor db_up = at::empty({adapters, dims.d}, up_options);
  dispatch_dtype(dtype, [&](auto t, auto a) {
    using T = decltype(t);
    using acc_t = decltype(a);
    at::Tensor partials = empty_output({static_cast<int64_t>(groups.size()), size}, x.options().dtype(acc));
    bool tiles = false;
    if (dims.n > 0) {
      const BrgemmLayout layout = brgemm_layout(dtype);
      if constexpr (sizeof(T) == 2) {
        if (layout != BrgemmLayout::none) {
          backward_blocks_brgemm<T>(op, layout, seg, groups, dx, partials);
          tiles = true;
        } else {
          backward_blocks<T, acc_t>(op, seg, groups, dx, partials);
        }
      } else {
        backward_blocks<T, acc_t>(op, seg, groups, dx, partials);
      }
      plain_rows<T>(op, seg, dx);
    }
    write_gradients<acc_t>(partials, groups, dims, tiles, dw_down, db_down, dw_up, db_up);
  });

  return {dx, dw_down, db_down, dw_up, db_up};
}


}  // namespace adapterfast::cpu
