// The grouped adapter op on CPU: row i of x goes through adapter adapter_index[i] of a bank of A
// adapters (stacked weights), or through none when the index is -1. Semantics:
// adapterfast/grouped_reference.py. Registered as adapterfast_cpu::grouped_forward and
// adapterfast_cpu::grouped_backward.
//
// Rows are counting-sorted by adapter (stable, O(N)), and each adapter's rows are cut into blocks
// of at most kBlockRows rows, so every block belongs to one adapter and runs the same block
// kernels as the single-adapter op (block_kernels.h) with that adapter's weights. A block gathers
// its rows of x (and residual / grad_y) into a block-sized scratch that stays in cache, and
// scatters its output rows back: per row, x is read from memory once and y written once, as in
// the single-adapter op, whatever the order of the rows. Rows without an adapter are copied
// (y = residual; dx = g or 0).
//
// Backward chain rule per adapter a over its rows, m the dropout keep-mask,
// s = scales[a] / (1 - p):
//     gz = g * m * s;   db_up[a] = sum gz;   dw_up[a] = gz^T act(h)
//     dh = (gz Wu[a]) * act'(h);   db_down[a] = sum dh;   dw_down[a] = dh^T x
//     dx = dh Wd[a] (+ g when the residual is x)
// Weight gradients are deterministic: an adapter's blocks are split into a number of contiguous
// groups that depends only on the row counts, each group sums fp32 partials block by block, and
// the groups are summed in order. Adapters without rows get zero gradients.
#include <cstring>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "activations.h"
#include "adapter_common.h"
#include "philox.h"

namespace adapterfast::cpu {
namespace {

constexpr const char* kForward = "adapterfast_cpu::grouped_forward";
constexpr const char* kBackward = "adapterfast_cpu::grouped_backward";
constexpr int64_t kMaxGroupsPerAdapter = 32;

// Rows sorted by adapter: order[offsets[s] .. offsets[s + 1]) are the rows of slot s, where slot 0
// holds the rows without an adapter and slot a + 1 those of adapter a; original order is kept
// within a slot.
struct Segments {
  std::vector<int64_t> order;
  std::vector<int64_t> offsets;

  int64_t rows(int64_t slot) const { return offsets[slot + 1] - offsets[slot]; }
};

Segments sort_rows(const char* op, const at::Tensor& adapter_index, int64_t n, int64_t adapters) {
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

// A block: rows order[begin, end) of one adapter.
struct Block {
  int64_t adapter;
  int64_t begin;
  int64_t end;
};

std::vector<Block> adapter_blocks(const Segments& seg, int64_t adapter) {
  std::vector<Block> blocks;
  const int64_t end = seg.offsets[adapter + 2];
  for (int64_t begin = seg.offsets[adapter + 1]; begin < end; begin += kBlockRows) {
    blocks.push_back({adapter, begin, std::min(begin + kBlockRows, end)});
  }
  return blocks;
}

std::vector<Block> all_blocks(const Segments& seg, int64_t adapters) {
  std::vector<Block> blocks;
  for (int64_t a = 0; a < adapters; ++a) {
    const std::vector<Block> mine = adapter_blocks(seg, a);
    blocks.insert(blocks.end(), mine.begin(), mine.end());
  }
  return blocks;
}

// Shapes of the stacked operands: x [n, d], w_down [A, r, d], w_up [A, d, r], b_down [A, r],
// b_up [A, d], scales [A]. Dtype and device checks are those of the single-adapter op (adapter 0).
Dims check_stacked(const char* op, const at::Tensor& x, const at::Tensor& w_down,
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

// Stacked weights as matmul operands: rounded to x's dtype, held in the accumulation type,
// contiguous; `transpose` swaps the last two dimensions.
at::Tensor stacked_operand(const at::Tensor& w, at::ScalarType x_dtype, bool transpose) {
  const at::Tensor oriented = transpose ? w.transpose(1, 2) : w;
  return oriented.to(x_dtype).to(accumulation_type(x_dtype)).contiguous();
}

std::vector<double> scale_values(const at::Tensor& scales, double dropout_p) {
  const at::Tensor s = scales.to(at::kDouble).contiguous();
  std::vector<double> out(s.data_ptr<double>(), s.data_ptr<double>() + s.numel());
  if (dropout_p > 0.0) {
    for (double& v : out) v /= (1.0 - dropout_p);
  }
  return out;
}

// Copies rows order[begin, end) of a 2-D tensor of T into dst [m, width] as acc_t.
template <typename T, typename acc_t>
void gather_rows(const at::Tensor& t, const int64_t* order, int64_t m, acc_t* dst) {
  const T* data = t.data_ptr<T>();
  const int64_t width = t.size(1);
  const int64_t rs = t.stride(0);
  const int64_t cs = width == 1 ? 1 : t.stride(1);
  for (int64_t i = 0; i < m; ++i) {
    const T* src = data + order[i] * rs;
    acc_t* out = dst + i * width;
    if (cs == 1 && std::is_same_v<T, acc_t>) {
      std::memcpy(out, src, width * sizeof(acc_t));
    } else if (cs == 1) {
      for (int64_t k = 0; k < width; ++k) out[k] = static_cast<acc_t>(src[k]);
    } else {
      for (int64_t k = 0; k < width; ++k) out[k] = static_cast<acc_t>(src[k * cs]);
    }
  }
}

// Copies rows order[begin, end) of a tensor with unit column stride, bytewise.
void gather_bytes(const at::Tensor& t, const int64_t* order, int64_t m, char* dst) {
  const char* data = static_cast<const char*>(t.data_ptr());
  const int64_t row_bytes = t.size(1) * t.element_size();
  const int64_t stride_bytes = t.stride(0) * t.element_size();
  for (int64_t i = 0; i < m; ++i) std::memcpy(dst + i * row_bytes, data + order[i] * stride_bytes, row_bytes);
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

void store_fence() {
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

struct ForwardOperands {
  Dims dims;
  int64_t adapters;
  at::Tensor x;
  at::Tensor w_down_t;  // [A, d, r], accumulation type
  at::Tensor w_up_t;    // [A, r, d], accumulation type
  std::optional<at::Tensor> b_down;  // [A, r], accumulation type
  std::optional<at::Tensor> b_up;    // [A, d], accumulation type
  std::optional<at::Tensor> residual;  // columns contiguous
  std::vector<double> scales;          // divided by 1 - p
  Activation activation;
  double dropout_p;
  uint64_t seed;
};

template <typename T, typename acc_t>
void forward_blocks(const ForwardOperands& op, const Segments& seg, at::Tensor& y, at::Tensor& h) {
  const BlockKernels<acc_t>& kernels = block_kernels<acc_t>();
  const auto [n, d, r] = op.dims;
  const std::vector<Block> blocks = all_blocks(seg, op.adapters);
  const acc_t* w_down_t = op.w_down_t.data_ptr<acc_t>();
  const acc_t* w_up_t = op.w_up_t.data_ptr<acc_t>();
  const acc_t* b_down = op.b_down ? op.b_down->data_ptr<acc_t>() : nullptr;
  const acc_t* b_up = op.b_up ? op.b_up->data_ptr<acc_t>() : nullptr;
  acc_t* h_data = h.data_ptr<acc_t>();
  T* y_data = y.data_ptr<T>();
  const bool dropout = op.dropout_p > 0.0;
  const uint32_t threshold = philox::threshold(op.dropout_p);
  const int64_t ld_keep = keep_row_bytes(d);
  const int64_t res_bytes = op.residual ? op.residual->element_size() : 0;
  const bool stream = y.nbytes() >= kStreamOutputBytes;

  OutputEpilogue<acc_t> epilogue;
  epilogue.out_kind = kind_of(y.scalar_type());
  epilogue.ld_out = d;
  epilogue.ld_keep = ld_keep;
  if (op.residual) {
    epilogue.res_kind = kind_of(op.residual->scalar_type());
    epilogue.ld_res = d;
  } else {
    epilogue.res_kind = std::is_same_v<acc_t, double> ? Kind::f64 : Kind::f32;
    epilogue.ld_res = d;
  }

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

      gather_rows<T, acc_t>(op.x, rows, m, xb.data());
      kernels.project_in(m, r, d, xb.data(), d, w_down_t + adapter * d * r, r, hb.data(), r);
      if (b_down != nullptr) {
        const acc_t* bias = b_down + adapter * r;
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < r; ++j) hb[i * r + j] += bias[j];
        }
      }
      for (int64_t i = 0; i < m; ++i) std::memcpy(h_data + rows[i] * r, hb.data() + i * r, r * sizeof(acc_t));
      visit<acc_t>(op.activation, [&](auto f) {
        for (int64_t idx = 0; idx < m * r; ++idx) a[idx] = round_as<T>(f.value(hb[idx]));
      });

      if (dropout) {
        for (int64_t i = 0; i < m; ++i) kernels.dropout_keep(op.seed, threshold, rows[i], 1, d, keep.data() + i * ld_keep, ld_keep);
      }
      e.keep = dropout ? keep.data() : nullptr;
      if (op.residual) {
        gather_bytes(*op.residual, rows, m, res.data());
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

  const int64_t plain = seg.rows(0);
  if (plain > 0) {
    const int64_t* rows = seg.order.data();
    copy_plain_rows<T>(op.residual ? op.residual : std::optional<at::Tensor>(op.x), rows, plain, d, y_data);
    for (int64_t i = 0; i < plain; ++i) std::fill(h_data + rows[i] * r, h_data + (rows[i] + 1) * r, acc_t(0));
  }
}

std::tuple<at::Tensor, at::Tensor> grouped_forward(
    const at::Tensor& x, const at::Tensor& w_down, const std::optional<at::Tensor>& b_down,
    const at::Tensor& w_up, const std::optional<at::Tensor>& b_up, const at::Tensor& scales,
    const at::Tensor& adapter_index, const std::optional<at::Tensor>& residual, c10::string_view activation,
    double dropout_p, int64_t seed) {
  const Dims dims = check_stacked(kForward, x, w_down, b_down, w_up, b_up, scales);
  check_dropout(kForward, dropout_p);
  const int64_t adapters = w_down.size(0);
  const Segments seg = sort_rows(kForward, adapter_index, dims.n, adapters);
  const at::ScalarType dtype = x.scalar_type();
  const at::ScalarType acc = accumulation_type(dtype);

  ForwardOperands op{dims,
                     adapters,
                     x,
                     stacked_operand(w_down, dtype, /*transpose=*/true),
                     stacked_operand(w_up, dtype, /*transpose=*/true),
                     operand_bias(b_down, dtype),
                     operand_bias(b_up, dtype),
                     std::nullopt,
                     scale_values(scales, dropout_p),
                     parse_activation(std::string(activation)),
                     dropout_p,
                     static_cast<uint64_t>(seed)};
  if (residual.has_value()) {
    check_like_x(kForward, "residual", *residual, dims);
    const bool readable = acc == at::kDouble || residual->scalar_type() != at::kDouble;
    op.residual = with_unit_column_stride(readable ? *residual : residual->to(at::kFloat));
  }

  at::Tensor y = empty_output({dims.n, dims.d}, x.options());
  at::Tensor h = at::empty({dims.n, dims.r}, x.options().dtype(acc));
  if (dims.n == 0) return {y, h};
  dispatch_dtype(dtype, [&](auto t, auto a) { forward_blocks<decltype(t), decltype(a)>(op, seg, y, h); });
  return {y, h};
}

// One group's partial sums: dw_up^T [r, d], dw_down [r, d], db_up [d], db_down [r].
template <typename acc_t>
struct Partials {
  acc_t* dw_up_t;
  acc_t* dw_down;
  acc_t* db_up;
  acc_t* db_down;

  static int64_t size(const Dims& dims) { return 2 * dims.r * dims.d + dims.d + dims.r; }

  Partials(acc_t* row, const Dims& dims)
      : dw_up_t(row),
        dw_down(row + dims.r * dims.d),
        db_up(row + 2 * dims.r * dims.d),
        db_down(row + 2 * dims.r * dims.d + dims.d) {}
};

// A unit of backward work: a contiguous run of one adapter's blocks, summed into one partials row.
struct Group {
  int64_t adapter;
  std::vector<Block> blocks;
};

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

struct BackwardOperands {
  Dims dims;
  int64_t adapters;
  at::Tensor grad_y;  // columns contiguous
  at::Tensor x;
  at::Tensor w_down;  // [A, r, d], accumulation type
  at::Tensor w_up;    // [A, d, r], accumulation type
  at::Tensor h;       // [N, r], accumulation type, contiguous
  std::vector<double> scales;  // divided by 1 - p
  bool residual_is_x;
  Activation activation;
  double dropout_p;
  uint64_t seed;
};

template <typename T, typename acc_t>
void backward_blocks(const BackwardOperands& op, const Segments& seg, const std::vector<Group>& groups,
                     at::Tensor& dx, at::Tensor& partials) {
  const BlockKernels<acc_t>& kernels = block_kernels<acc_t>();
  const auto [n, d, r] = op.dims;
  const acc_t* w_down = op.w_down.data_ptr<acc_t>();
  const acc_t* w_up = op.w_up.data_ptr<acc_t>();
  const acc_t* h_data = op.h.data_ptr<acc_t>();
  T* dx_data = dx.data_ptr<T>();
  const bool dropout = op.dropout_p > 0.0;
  const uint32_t threshold = philox::threshold(op.dropout_p);
  const int64_t ld_keep = keep_row_bytes(d);
  const bool stream = dx.nbytes() >= kStreamOutputBytes;

  OutputEpilogue<acc_t> epilogue;
  epilogue.res_kind = kind_of(op.grad_y.scalar_type());
  epilogue.ld_res = d;
  epilogue.out_kind = kind_of(dx.scalar_type());
  epilogue.ld_out = d;

  at::parallel_for(0, static_cast<int64_t>(groups.size()), 1, [&](int64_t first, int64_t last) {
    std::vector<T> gb(kBlockRows * d);
    std::vector<acc_t> gz(kBlockRows * d);
    std::vector<acc_t> xb(kBlockRows * d);
    std::vector<acc_t> hb(kBlockRows * r);
    std::vector<acc_t> da(kBlockRows * r);
    std::vector<acc_t> a(kBlockRows * r);
    std::vector<acc_t> dh(kBlockRows * r);
    std::vector<T> dxb(kBlockRows * d);
    std::vector<uint8_t> keep(dropout ? kBlockRows * ld_keep : 0);
    OutputEpilogue<acc_t> e = epilogue;
    for (int64_t gi = first; gi < last; ++gi) {
      const Group& group = groups[gi];
      const int64_t adapter = group.adapter;
      const acc_t factor = static_cast<acc_t>(op.scales[adapter]);
      acc_t* row = partials.data_ptr<acc_t>() + gi * partials.size(1);
      std::fill(row, row + partials.size(1), acc_t(0));
      const Partials<acc_t> sums(row, op.dims);
      for (const Block& block : group.blocks) {
        const int64_t m = block.end - block.begin;
        const int64_t* rows = seg.order.data() + block.begin;

        // gz = g * keep * s, rounded to x's dtype as a matmul operand; db_up sums it unrounded.
        gather_bytes(op.grad_y, rows, m, reinterpret_cast<char*>(gb.data()));
        for (int64_t i = 0; i < m; ++i) {
          const uint8_t* kr = nullptr;
          if (dropout) {
            kr = keep.data() + i * ld_keep;
            kernels.dropout_keep(op.seed, threshold, rows[i], 1, d, keep.data() + i * ld_keep, ld_keep);
          }
          const T* g = gb.data() + i * d;
          acc_t* out = gz.data() + i * d;
          for (int64_t k = 0; k < d; ++k) {
            const acc_t v = static_cast<acc_t>(g[k]) * (kr == nullptr || kr[k] ? factor : acc_t(0));
            sums.db_up[k] += v;
            out[k] = round_as<T>(v);
          }
        }

        // dh = (gz Wu) * act'(h); a = act(h) from the saved pre-activation.
        kernels.project_in(m, r, d, gz.data(), d, w_up + adapter * d * r, r, da.data(), r);
        for (int64_t i = 0; i < m; ++i) std::memcpy(hb.data() + i * r, h_data + rows[i] * r, r * sizeof(acc_t));
        visit<acc_t>(op.activation, [&](auto f) {
          for (int64_t idx = 0; idx < m * r; ++idx) {
            const acc_t value = backprop(f, hb[idx], da[idx]);
            sums.db_down[idx % r] += value;
            dh[idx] = round_as<T>(value);
            a[idx] = round_as<T>(f.value(hb[idx]));
          }
        });

        gather_rows<T, acc_t>(op.x, rows, m, xb.data());
        kernels.accumulate_outer(m, r, d, a.data(), r, gz.data(), d, sums.dw_up_t, d);
        kernels.accumulate_outer(m, r, d, dh.data(), r, xb.data(), d, sums.dw_down, d);

        e.res = op.residual_is_x ? gb.data() : nullptr;
        e.out = dxb.data();
        kernels.project_out(m, r, d, dh.data(), r, w_down + adapter * r * d, d, e);
        scatter_rows(dxb.data(), rows, m, d, dx_data, stream);
      }
    }
    store_fence();
  });

  const int64_t plain = seg.rows(0);
  if (plain > 0) {
    copy_plain_rows<T>(op.residual_is_x ? std::optional<at::Tensor>(op.grad_y) : std::nullopt, seg.order.data(), plain,
                       d, dx_data);
  }
}

// totals[a] = the partials of adapter a's groups summed in group order (zeros for unused adapters).
template <typename acc_t>
at::Tensor sum_partials(const at::Tensor& partials, const std::vector<Group>& groups, int64_t adapters) {
  const int64_t size = partials.size(1);
  at::Tensor totals = at::zeros({adapters, size}, partials.options());
  const acc_t* src = partials.data_ptr<acc_t>();
  acc_t* dst = totals.data_ptr<acc_t>();
  at::parallel_for(0, size, 4096, [&](int64_t begin, int64_t end) {
    for (size_t g = 0; g < groups.size(); ++g) {
      const acc_t* part = src + g * size;
      acc_t* total = dst + groups[g].adapter * size;
      for (int64_t k = begin; k < end; ++k) total[k] += part[k];
    }
  });
  return totals;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w_down, const std::optional<at::Tensor>& b_down,
    const at::Tensor& w_up, const std::optional<at::Tensor>& b_up, const at::Tensor& scales,
    const at::Tensor& adapter_index, const at::Tensor& h, bool residual_is_x, c10::string_view activation,
    double dropout_p, int64_t seed) {
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
                            stacked_operand(w_down, dtype, /*transpose=*/false),
                            stacked_operand(w_up, dtype, /*transpose=*/false),
                            h.to(acc).contiguous(),
                            scale_values(scales, dropout_p),
                            residual_is_x,
                            parse_activation(std::string(activation)),
                            dropout_p,
                            static_cast<uint64_t>(seed)};

  at::Tensor dx = empty_output({dims.n, dims.d}, x.options());
  const int64_t size = Partials<float>::size(dims);
  at::Tensor totals;
  dispatch_dtype(dtype, [&](auto t, auto a) {
    using T = decltype(t);
    using acc_t = decltype(a);
    at::Tensor partials = at::empty({static_cast<int64_t>(groups.size()), size}, x.options().dtype(acc));
    if (dims.n > 0) backward_blocks<T, acc_t>(op, seg, groups, dx, partials);
    totals = sum_partials<acc_t>(partials, groups, adapters);
  });

  const int64_t rd = dims.r * dims.d;
  at::Tensor dw_up = totals.narrow(1, 0, rd).reshape({adapters, dims.r, dims.d}).transpose(1, 2).contiguous()
                         .to(w_up.scalar_type());
  at::Tensor dw_down = totals.narrow(1, rd, rd).reshape({adapters, dims.r, dims.d}).to(w_down.scalar_type());
  at::Tensor db_up = totals.narrow(1, 2 * rd, dims.d).contiguous().to(w_up.scalar_type());
  at::Tensor db_down = totals.narrow(1, 2 * rd + dims.d, dims.r).contiguous().to(w_down.scalar_type());
  return {dx, dw_down, db_down, dw_up, db_up};
}

}  // namespace
}  // namespace adapterfast::cpu

TORCH_LIBRARY_FRAGMENT(adapterfast_cpu, m) {
  m.def(
      "grouped_forward(Tensor x, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, Tensor scales, "
      "Tensor adapter_index, Tensor? residual, str activation, float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def(
      "grouped_backward(Tensor grad_y, Tensor x, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, "
      "Tensor scales, Tensor adapter_index, Tensor h, bool residual_is_x, str activation, float dropout_p, "
      "int seed) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(adapterfast_cpu, CPU, m) {
  m.impl("grouped_forward", &adapterfast::cpu::grouped_forward);
  m.impl("grouped_backward", &adapterfast::cpu::grouped_backward);
}
