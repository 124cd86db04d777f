// Gradient writes (see gradient_writes.h).
#include "gradient_writes.h"

#include <array>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include "block_kernels.h"
#include "convert_rows.h"
#include "matrix_copy.h"
#include "scratch.h"

namespace adapterfast::cpu {
namespace {

// Columns of fp32 sums transposed at a time on their way to a 16-bit gradient: a 32 KiB panel,
// transposed in L1 and rounded from there.
constexpr int64_t kNarrowPanelFloats = 8192;

}  // namespace

template <typename acc_t>
void write_gradient(const SumChunks<acc_t>& sums, bool transpose, acc_t factor, at::Tensor& out, int64_t col0) {
  const int64_t rows = sums.rows;
  const int64_t ld = out.size(1);
  const at::ScalarType dtype = out.scalar_type();
  const int64_t offset = transpose ? col0 * ld : col0;
  if (transpose && dtype == c10::CppTypeToScalarType<acc_t>::value && factor == acc_t(1)) {
    acc_t* dst = out.data_ptr<acc_t>() + offset;
    sums.each([&](const acc_t* src, int64_t c0, int64_t nc) {
      block_kernels<acc_t>().transpose(rows, nc, src, nc, dst + c0 * rows);
    });
    return;
  }
  if constexpr (std::is_same_v<acc_t, float>) {
    if (dtype == at::kHalf || dtype == at::kBFloat16) {  // rounded 8 at a time (narrow_row)
      const auto narrow = [&](auto* dst) {
        if (!transpose) {
          sums.each([&](const float* src, int64_t c0, int64_t nc) {
            for (int64_t i = 0; i < rows; ++i) narrow_row(src + i * nc, factor, dst + i * ld + c0, nc);
          });
          return;
        }
        const int64_t panel = std::max<int64_t>(16, kNarrowPanelFloats / std::max<int64_t>(rows, 1));
        Scratch<float> t(panel * rows);
        sums.each([&](const float* src, int64_t c0, int64_t nc) {
          for (int64_t p0 = 0; p0 < nc; p0 += panel) {
            const int64_t pc = std::min(panel, nc - p0);
            block_kernels<float>().transpose(rows, pc, src + p0, nc, t.data());
            for (int64_t k = 0; k < pc; ++k) narrow_row(t.data() + k * rows, factor, dst + (c0 + p0 + k) * rows, rows);
          }
        });
      };
      if (dtype == at::kHalf) {
        narrow(out.data_ptr<c10::Half>() + offset);
      } else {
        narrow(out.data_ptr<c10::BFloat16>() + offset);
      }
      return;
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "adapterfast_cpu_gradient", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>() + offset;
    const auto convert = [factor](acc_t v) { return static_cast<scalar_t>(v * factor); };
    sums.each([&](const acc_t* src, int64_t c0, int64_t nc) {
      if (transpose) {
        copy_matrix(src, nc, 1, rows, nc, true, dst + c0 * rows, convert);
      } else {
        for (int64_t i = 0; i < rows; ++i) copy_matrix(src + i * nc, nc, 1, 1, nc, false, dst + i * ld + c0, convert);
      }
    });
  });
}

template <typename acc_t>
at::Tensor gradient(const SumChunks<acc_t>& sums, bool transpose, acc_t factor, at::ScalarType dtype,
                    const at::TensorOptions& options) {
  const std::array<int64_t, 2> sizes =
      transpose ? std::array<int64_t, 2>{sums.cols, sums.rows} : std::array<int64_t, 2>{sums.rows, sums.cols};
  at::Tensor out = at::empty(sizes, options.dtype(dtype));
  write_gradient(sums, transpose, factor, out, 0);
  return out;
}

void WeightGradients::write_up(const float* up, int64_t c0, int64_t nc) {
  write_gradient(SumChunks<float>::row_major(up, dw_up.size(1), nc), true, up_factor, dw_up, c0);
}

void WeightGradients::write_down(const float* down, int64_t c0, int64_t nc) {
  write_gradient(SumChunks<float>::row_major(down, dw_down.size(0), nc), false, 1.0f, dw_down, c0);
}

template void write_gradient<float>(const SumChunks<float>&, bool, float, at::Tensor&, int64_t);
template void write_gradient<double>(const SumChunks<double>&, bool, double, at::Tensor&, int64_t);
template at::Tensor gradient<float>(const SumChunks<float>&, bool, float, at::ScalarType, const at::TensorOptions&);
template at::Tensor gradient<double>(const SumChunks<double>&, bool, double, at::ScalarType,
                                     const at::TensorOptions&);

}  // namespace adapterfast::cpu
