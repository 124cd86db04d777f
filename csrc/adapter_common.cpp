#include "adapter_common.h"

#include <algorithm>
#include <array>

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include "output_buffers.h"
#include "scratch.h"

namespace adapterfast::cpu {
namespace {

bool supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble;
}

void check_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_TYPE(supported_dtype(t.scalar_type()), op, ": ", name,
                   " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
}

}  // namespace

int64_t forward_block_rows(int64_t n, int64_t granule, int64_t min_rows_per_thread) {
  const int64_t threads = std::clamp<int64_t>(n / min_rows_per_thread, 1, at::get_num_threads());
  int64_t best = kBlockRows;
  int64_t best_rows_per_thread = n;
  for (int64_t rows = kBlockRows; rows >= std::max<int64_t>(16, granule); rows -= granule) {
    const int64_t blocks = (n + rows - 1) / rows;
    const int64_t rows_per_thread = std::min(n, (blocks + threads - 1) / threads * rows);
    if (rows_per_thread < best_rows_per_thread) {
      best = rows;
      best_rows_per_thread = rows_per_thread;
    }
  }
  return best;
}

Dims check_operands(const char* op, const at::Tensor& x, const at::Tensor& w_down,
                    const std::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                    const std::optional<at::Tensor>& b_up) {
  check_tensor(op, "x", x);
  check_tensor(op, "w_down", w_down);
  check_tensor(op, "w_up", w_up);
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [N, d], got shape ", x.sizes());
  TORCH_CHECK_VALUE(w_down.dim() == 2 && w_up.dim() == 2, op,
                    ": w_down and w_up must be 2-D, got shapes ", w_down.sizes(), " and ", w_up.sizes());
  const Dims dims{x.size(0), x.size(1), w_down.size(0)};
  TORCH_CHECK_VALUE(dims.d >= 1 && dims.r >= 1, op, ": need d >= 1 and r >= 1, got x ", x.sizes(),
                    " and w_down ", w_down.sizes());
  TORCH_CHECK_VALUE(w_down.size(1) == dims.d && w_up.size(0) == dims.d && w_up.size(1) == dims.r, op,
                    ": expected w_down [r, d] and w_up [d, r] for x ", x.sizes(), ", got w_down ",
                    w_down.sizes(), " and w_up ", w_up.sizes());
  if (b_down.has_value()) {
    check_tensor(op, "b_down", *b_down);
    TORCH_CHECK_VALUE(b_down->dim() == 1 && b_down->size(0) == dims.r, op, ": b_down must be [",
                      dims.r, "], got ", b_down->sizes());
  }
  if (b_up.has_value()) {
    check_tensor(op, "b_up", *b_up);
    TORCH_CHECK_VALUE(b_up->dim() == 1 && b_up->size(0) == dims.d, op, ": b_up must be [", dims.d,
                      "], got ", b_up->sizes());
  }
  return dims;
}

void check_like_x(const char* op, const char* name, const at::Tensor& t, const Dims& dims) {
  check_tensor(op, name, t);
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == dims.n && t.size(1) == dims.d, op, ": ", name,
                    " must be [", dims.n, ", ", dims.d, "] like x, got ", t.sizes());
}

std::optional<at::Tensor> residual_operand(const char* op, const std::optional<at::Tensor>& residual,
                                           const Dims& dims, at::ScalarType acc) {
  if (!residual.has_value()) return std::nullopt;
  check_like_x(op, "residual", *residual, dims);
  const bool readable = acc == at::kDouble || residual->scalar_type() != at::kDouble;
  return with_unit_column_stride(readable ? *residual : residual->to(at::kFloat));
}

void check_dropout(const char* op, double dropout_p) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ",
                    dropout_p);
}

namespace {

// A 16-bit weight with contiguous rows as float, [rows, cols] (rows widened 8 values at a time,
// widen_row) or transposed (widened and transposed in one pass by the block kernels). Its values
// are already in T, so rounding them to T (as copy_matrix's conversion below does) would change
// nothing.
template <typename T>
at::Tensor widened(const at::Tensor& w, bool transpose) {
  const int64_t rows = w.size(0), cols = w.size(1);
  at::Tensor out = at::empty(transpose ? at::IntArrayRef{cols, rows} : at::IntArrayRef{rows, cols},
                             w.options().dtype(at::kFloat));
  const T* src = w.data_ptr<T>();
  if (transpose) {
    block_kernels<float>().widen_transposed(rows, cols, src, kind_of(w.scalar_type()), w.stride(0),
                                            out.data_ptr<float>());
  } else {
    for (int64_t i = 0; i < rows; ++i) widen_row(src + i * w.stride(0), out.data_ptr<float>() + i * cols, cols);
  }
  return out;
}

// Whether operand_weight(w, x_dtype, transpose) is w itself.
bool operand_is_weight(const at::Tensor& w, at::ScalarType x_dtype, bool transpose) {
  const at::ScalarType w_dtype = w.scalar_type();
  return !transpose && w_dtype == x_dtype && w_dtype == accumulation_type(x_dtype) && w.is_contiguous();
}

}  // namespace

at::Tensor weight_in_x_dtype(const at::Tensor& w, at::ScalarType x_dtype) {
  return w.to(x_dtype).contiguous();
}

at::Tensor operand_weight(const at::Tensor& w, at::ScalarType x_dtype, bool transpose) {
  const at::ScalarType acc = accumulation_type(x_dtype);
  const at::ScalarType w_dtype = w.scalar_type();
  if (operand_is_weight(w, x_dtype, transpose)) return w;
  at::Tensor out;
  dispatch_dtype(x_dtype, [&](auto t, auto a) {
    using T = decltype(t);
    using acc_t = decltype(a);
    const auto copy_from = [&](auto source) {
      using W = decltype(source);
      const std::array<int64_t, 2> sizes = transpose ? std::array<int64_t, 2>{w.size(1), w.size(0)}
                                                      : std::array<int64_t, 2>{w.size(0), w.size(1)};
      out = at::empty(sizes, w.options().dtype(acc));
      copy_matrix(w.data_ptr<W>(), w.stride(0), w.stride(1), w.size(0), w.size(1), transpose,
                  out.data_ptr<acc_t>(), [](W v) { return round_as<T>(static_cast<acc_t>(v)); });
    };
    if (transpose && w_dtype == x_dtype && std::is_same_v<T, acc_t> && w.stride(1) == 1) {
      out = at::empty({w.size(1), w.size(0)}, w.options());
      block_kernels<acc_t>().transpose(w.size(0), w.size(1), w.data_ptr<acc_t>(), w.stride(0),
                                       out.data_ptr<acc_t>());
    } else if (w_dtype == x_dtype) {
      if constexpr (!std::is_same_v<T, acc_t> && std::is_same_v<acc_t, float>) {
        if (w.size(1) == 1 || w.stride(1) == 1) {
          out = widened<T>(w, transpose);
          return;
        }
      }
      copy_from(T{});
    } else if (w_dtype == at::kFloat && acc == at::kFloat) {
      copy_from(float{});
    }
  });
  if (out.defined()) return out;
  const at::Tensor oriented = transpose ? w.t() : w;
  return oriented.to(x_dtype).to(acc).contiguous();
}

std::pair<at::Tensor, at::Tensor> operand_weights(const at::Tensor& w_down, const at::Tensor& w_up,
                                                  at::ScalarType x_dtype, bool transpose, const Dims& dims) {
  const bool copies = !operand_is_weight(w_down, x_dtype, transpose) && !operand_is_weight(w_up, x_dtype, transpose);
  std::pair<at::Tensor, at::Tensor> out;
  const int64_t bound = dims.n > kBlockRows ? kParallelWeightElements : kSideBySideWeightElements;
  side_by_side(copies && dims.r * dims.d >= bound,
               [&] { out.first = operand_weight(w_down, x_dtype, transpose); },
               [&] { out.second = operand_weight(w_up, x_dtype, transpose); });
  return out;
}

std::optional<at::Tensor> operand_bias(const std::optional<at::Tensor>& b, at::ScalarType x_dtype) {
  if (!b.has_value()) return std::nullopt;
  return b->to(accumulation_type(x_dtype)).contiguous();
}

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::detail::empty_generic(sizes, output_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                             options.dtype().toScalarType(), at::MemoryFormat::Contiguous);
  if (poison_scratch() && out.numel() > 0) std::memset(out.data_ptr(), 0xFF, out.nbytes());
  return out;
}

at::Tensor with_unit_column_stride(const at::Tensor& t) {
  return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous();
}

}  // namespace adapterfast::cpu
