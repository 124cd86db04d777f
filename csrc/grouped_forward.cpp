// The grouped forward on CPU (adapterfast_cpu::grouped_forward): row i of x goes through adapter
// adapter_index[i] of a bank of A adapters, or through none when the index is -1 (y = residual).
// Semantics: adapterfast/grouped_reference.py.
//
// Rows are counting-sorted by adapter and each adapter's rows cut into blocks of at most
// kBlockRows rows (grouped_rows.h), so a block runs the single-adapter op's GEMMs with its
// adapter's weights. One driver (forward_blocks) does a block's work for every dtype; its two
// GEMMs come from a Gemms policy:
// - KernelGemms (float32, float64, and 16-bit x where brgemm does not run): the block kernels
//   (block_kernels.h); h = x Wd^T reads float32/float64 x rows where they lie, through the
//   block's row list (grouped_row_kernels.h, which prefetches the next rows under its FMAs),
//   and 16-bit x rows gathered into a cache-resident scratch in acc_t;
// - BrgemmGemms (bfloat16, float16 where brgemm runs, brgemm.h): h = x Wd^T and u = act(h) Wu^T
//   on brgemm (AMX or AVX512-BF16/FP16), as the single-adapter op's 16-bit driver does, u in
//   column chunks that the epilogue finishes.
// Per row, x is read from memory once and y written once, whatever the order of the rows: the
// output epilogue (bias, dropout, scale, residual) reads the residual rows and writes the y rows
// where they are, through the block's row list (OutputEpilogue::res_rows / out_rows), with
// non-temporal stores for a y of kScatteredStreamBytes or more (grouped_rows.h), so no y row
// passes through a scratch and no row of y is read for ownership. Without a separate residual, the epilogue reads x's rows back in place too
// (from cache: h = x Wd^T just read them). Only brgemm's x rows are gathered (prefetched one
// block ahead into L2): it takes them as a dense, padded operand.
#include "grouped_ops.h"

#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "activations.h"
#include "adapter_common.h"
#include "brgemm.h"
#include "grouped_brgemm_columns.h"
#include "grouped_row_kernels.h"
#include "grouped_rows.h"
#include "grouped_weights.h"
#include "philox.h"
#include "scratch.h"

namespace adapterfast::cpu {
namespace {

using namespace grouped;
using at::native::cpublas::brgemm;
using at::native::cpublas::brgemm_release;

constexpr const char* kForward = "adapterfast_cpu::grouped_forward";

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

// A block's two GEMMs on the block kernels: a held in acc_t. Each thread transposes an adapter's
// two weights when its first block of that adapter starts, into a buffer of its own (Weights),
// where that adapter's blocks then find them in cache: no pass over all adapters' weights up
// front, no [A][d, r] workspace written and read back from memory (at A = 32 that pass was 8% of
// the forward's kernel time). x rows of T = acc_t with contiguous columns are read where they
// lie, through the block's row list (grouped_row_kernels.h); others (16-bit x where brgemm does
// not run, strided columns) are gathered into a scratch of acc_t first.
template <typename T, typename acc_t>
struct KernelGemms {
  using op_t = acc_t;  // element type of the gathered x rows and of a
  static constexpr int64_t kChunk = 0;
  static constexpr bool kRowList = std::is_same_v<T, acc_t>;  // may read x rows in place
  const BlockKernels<acc_t>& kernels;
  const RowKernels<acc_t>& row_kernels;
  int64_t d, r;
  at::Tensor w_down;  // [A, r, d], contiguous
  at::Tensor w_up;    // [A, d, r], contiguous
  const acc_t* x_in_place = nullptr;  // x's data where the GEMM reads its rows in place
  int64_t ld_x_in_place = 0;

  // One thread's operands of the adapter it runs now.
  struct Weights {
    int64_t adapter = -1;
    Scratch<acc_t> down_t;  // [d, r]
    Scratch<acc_t> up_t;    // [r, d]
  };

  KernelGemms(const ForwardOperands& op)
      : kernels(block_kernels<acc_t>()),
        row_kernels(grouped::row_kernels<acc_t>()),
        d(op.dims.d),
        r(op.dims.r),
        w_down(op.w_down.contiguous()),
        w_up(op.w_up.contiguous()) {
    if constexpr (std::is_same_v<T, acc_t>) {
      if (op.x.stride(1) == 1 || d == 1) {
        x_in_place = op.x.data_ptr<acc_t>();
        ld_x_in_place = op.x.stride(0);
      }
    }
  }

  Weights weights() const { return {-1, Scratch<acc_t>(d * r), Scratch<acc_t>(r * d)}; }
  void load(Weights& w, int64_t adapter) const {
    if (w.adapter == adapter) return;
    adapter_operand<T, acc_t>(w_down, adapter, /*transpose=*/true, w.down_t.data());
    adapter_operand<T, acc_t>(w_up, adapter, /*transpose=*/true, w.up_t.data());
    w.adapter = adapter;
  }

  int64_t ld_x() const { return d; }
  int64_t ld_a() const { return r; }
  // hb [m, r] = xb Wd^T.
  void down(int64_t m, const acc_t* xb, const Weights& w, acc_t* hb) const {
    kernels.project_in(m, r, d, xb, d, w.down_t.data(), r, hb, r);
  }
  // hb [m, r] = x[rows] Wd^T, x read in place (x_in_place set); `ahead` as in
  // RowKernels::project_in_rows.
  void down_rows(int64_t m, const int64_t* rows, int64_t ahead, const Weights& w, acc_t* hb) const {
    row_kernels.project_in_rows(m, r, d, x_in_place, ld_x_in_place, rows, ahead, w.down_t.data(), r, hb, r);
  }
  // The epilogue of a Wu^T, rows [m, r].
  void up(int64_t m, const acc_t* a, const Weights& w, const OutputEpilogue<acc_t>& e, float*) const {
    kernels.project_out(m, r, d, a, r, w.up_t.data(), d, e);
  }
  void release() const {}
};

// A block's two GEMMs on brgemm for 16-bit T: x rows and a in T, padded to even widths (the pad
// column zero), weights packed once per call for the adapters used.
template <typename T>
struct BrgemmGemms {
  using op_t = T;
  static constexpr int64_t kChunk = kBlockRows * kOutCols;
  static constexpr bool kRowList = false;  // brgemm takes x rows gathered and padded
  BrgemmLayout layout;
  int64_t d, r;
  const T* w_down_b;  // [A][even(d), r]
  const T* w_up_b;    // [A][even(r), d]

  BrgemmGemms(const ForwardOperands& op, BrgemmLayout layout, const std::vector<int64_t>& used)
      : layout(layout),
        d(op.dims.d),
        r(op.dims.r),
        w_down_b(packed_operand<T>(layout, op.w_down, /*transpose=*/true, used, 0)),
        w_up_b(packed_operand<T>(layout, op.w_up, /*transpose=*/true, used, 1)) {}

  // The adapter a thread runs now (its operands are in the packed stacks).
  struct Weights {
    int64_t adapter = -1;
  };
  Weights weights() const { return {}; }
  void load(Weights& w, int64_t adapter) const { w.adapter = adapter; }

  bool vnni() const { return layout == BrgemmLayout::vnni; }
  int64_t ld_x() const { return even(d); }
  int64_t ld_a() const { return even(r); }
  void down(int64_t m, const T* xb, const Weights& w, float* hb) const {
    brgemm(m, r, even(d), even(d), r, r, false, xb, w_down_b + w.adapter * even(d) * r, hb, vnni());
  }
  // u = a Wu[adapter]^T per chunk of kOutCols columns into `chunk`, each finished by the epilogue.
  void up(int64_t m, const T* a, const Weights& w, const OutputEpilogue<float>& e, float* chunk) const {
    finish_by_columns<T>(layout, m, even(r), d, a, even(r), w_up_b + w.adapter * even(r) * d, chunk, e);
  }
  void release() const { brgemm_release(vnni()); }
};

// The epilogue fields common to all blocks: y written in place through the row list, the
// residual read in place through it (or, without one, the block's gathered x rows).
template <typename acc_t, typename op_t>
OutputEpilogue<acc_t> base_epilogue(const ForwardOperands& op, const at::Tensor& y, int64_t ld_x) {
  OutputEpilogue<acc_t> e;
  e.out = y.data_ptr();
  e.out_kind = kind_of(y.scalar_type());
  e.ld_out = op.dims.d;
  e.ld_keep = keep_row_bytes(op.dims.d);
  e.stream_out = y.nbytes() >= kScatteredStreamBytes;
  if (op.residual) {
    e.res = op.residual->data_ptr();
    e.res_kind = kind_of(op.residual->scalar_type());
    e.ld_res = op.residual->stride(0);
  } else {
    e.res_kind = kind_of(c10::CppTypeToScalarType<op_t>::value);
    e.ld_res = ld_x;
  }
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

// Every block of every adapter: x rows gathered, h = x Wd^T + bd (to h), a = act(h) rounded to
// T, and y = res + s * keep * (a Wu^T + bu) written to the rows' places in y.
template <typename T, typename acc_t, typename Gemms>
void forward_blocks(const ForwardOperands& op, const Segments& seg, const Gemms& gemms, at::Tensor& y, at::Tensor& h) {
  using op_t = typename Gemms::op_t;
  const auto [n, d, r] = op.dims;
  const std::vector<Block> blocks = all_blocks(seg, op.adapters);
  const int64_t sorted_end = seg.offsets.back();
  const int64_t ld_x = gemms.ld_x();
  const int64_t ld_a = gemms.ld_a();
  const acc_t* b_down = op.b_down ? op.b_down->data_ptr<acc_t>() : nullptr;
  const acc_t* b_up = op.b_up ? op.b_up->data_ptr<acc_t>() : nullptr;
  acc_t* h_data = h.data_ptr<acc_t>();
  const bool dropout = op.dropout_p > 0.0;
  const uint32_t threshold = philox::threshold(op.dropout_p);
  const int64_t ld_keep = keep_row_bytes(d);
  const BlockKernels<float>& keep_kernels = block_kernels<float>();
  OutputEpilogue<acc_t> epilogue = base_epilogue<acc_t, op_t>(op, y, ld_x);
  bool in_place = false;
  if constexpr (Gemms::kRowList) {
    in_place = gemms.x_in_place != nullptr;
    if (in_place && !op.residual) {
      epilogue.res = gemms.x_in_place;
      epilogue.ld_res = gemms.ld_x_in_place;
    }
  }

  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t first, int64_t last) {
    Scratch<op_t> xb = Scratch<op_t>::zeroed(in_place ? 0 : kBlockRows * ld_x);
    Scratch<acc_t> hb(kBlockRows * r);
    Scratch<op_t> a = Scratch<op_t>::zeroed(kBlockRows * ld_a);
    Scratch<float> chunk(Gemms::kChunk);
    Scratch<uint8_t> keep(dropout ? kBlockRows * ld_keep : 0);
    typename Gemms::Weights weights = gemms.weights();
    OutputEpilogue<acc_t> e = epilogue;
    for (int64_t b = first; b < last; ++b) {
      const Block& block = blocks[b];
      const int64_t m = block.end - block.begin;
      const int64_t adapter = block.adapter;
      const int64_t* rows = seg.order.data() + block.begin;
      gemms.load(weights, adapter);

      if constexpr (Gemms::kRowList) {
        if (in_place) gemms.down_rows(m, rows, sorted_end - block.begin, weights, hb.data());
      }
      if (!in_place) {
        gather_rows<T, op_t>(op.x, rows, m, sorted_end - block.begin, xb.data(), ld_x);
        gemms.down(m, xb.data(), weights, hb.data());
      }
      finish_h(hb.data(), b_down != nullptr ? b_down + adapter * r : nullptr, rows, m, r, h_data);
      visit<acc_t>(op.activation, [&](auto f) {
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < r; ++j) a[i * ld_a + j] = static_cast<op_t>(round_as<T>(f.value(hb[i * r + j])));
        }
      });

      if (dropout) {
        for (int64_t i = 0; i < m; ++i) {
          keep_kernels.dropout_keep(op.seed, threshold, rows[i], 1, d, keep.data() + i * ld_keep, ld_keep);
        }
      }
      e.keep = dropout ? keep.data() : nullptr;
      if (op.residual || in_place) {
        e.res_rows = rows;
      } else {
        e.res = xb.data();
      }
      e.out_rows = rows;
      e.bias = b_up != nullptr ? b_up + adapter * d : nullptr;
      e.scale = static_cast<acc_t>(op.scales[adapter]);
      gemms.up(m, a.data(), weights, e, chunk.data());
    }
    store_fence();
    gemms.release();
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
  const std::vector<int64_t> used = seg.used();
  dispatch_dtype(dtype, [&](auto t, auto a) {
    using T = decltype(t);
    using acc_t = decltype(a);
    if constexpr (sizeof(T) == 2) {
      if (layout != BrgemmLayout::none) {
        forward_blocks<T, acc_t>(op, seg, BrgemmGemms<T>(op, layout, used), y, h);
        return plain_rows<T, acc_t>(op, seg, y, h);
      }
    }
    forward_blocks<T, acc_t>(op, seg, KernelGemms<T, acc_t>(op), y, h);
    plain_rows<T, acc_t>(op, seg, y, h);
  });
  return {y, h};
}

}  // namespace adapterfast::cpu
