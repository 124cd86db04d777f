#pragma once
// copy_matrix: the one loop that copies, converts and transposes the small matrices of every call
// (weights into operand layouts, weight gradients into outputs), shared by the drivers, the
// portable block kernels and the grouped op's weight preparation.
#include <algorithm>
#include <cstdint>

namespace adapterfast::cpu {

// dst = convert(src), or convert(src^T) with `transpose`, as a contiguous [rows, cols] matrix
// (transposed: [cols, rows]); src has strides (s0, s1). Plain loops in tiles of 16 x 16 for the
// small matrices of every call (weights, their gradients), which would otherwise each cost a
// TensorIterator copy and its dispatch: several microseconds, a whole small call's compute.
template <typename Src, typename Dst, typename Convert>
void copy_matrix(const Src* src, int64_t s0, int64_t s1, int64_t rows, int64_t cols, bool transpose,
                 Dst* dst, Convert convert) {
  if (!transpose) {
    for (int64_t i = 0; i < rows; ++i) {
      if (s1 == 1) {
        for (int64_t j = 0; j < cols; ++j) dst[i * cols + j] = convert(src[i * s0 + j]);
      } else {
        for (int64_t j = 0; j < cols; ++j) dst[i * cols + j] = convert(src[i * s0 + j * s1]);
      }
    }
    return;
  }
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    const int64_t i1 = std::min(rows, i0 + kTile);
    for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
      const int64_t j1 = std::min(cols, j0 + kTile);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) dst[j * rows + i] = convert(src[i * s0 + j * s1]);
      }
    }
  }
}

}  // namespace adapterfast::cpu
