// Portable block kernels: plain loops the compiler vectorises. They run float64 (gradcheck), and
// float where neither the AVX-512 kernels nor the BLAS ones apply (ADAPTERFAST_CPU_BLAS=0); the
// BLAS table takes its copies, its dropout mask and its epilogue from here (see block_kernels.h).
#include "block_kernels.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "convert_rows.h"
#include "matrix_copy.h"
#include "philox.h"

namespace adapterfast::cpu::generic {
namespace {

// Calls fn(T{}) with the C++ type stored for `kind`.
template <typename Fn>
void with_type(Kind kind, Fn&& fn) {
  switch (kind) {
    case Kind::f32: return fn(float{});
    case Kind::bf16: return fn(c10::BFloat16{});
    case Kind::f16: return fn(c10::Half{});
    case Kind::f64: return fn(double{});
  }
}

template <typename acc_t>
void project_in(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const acc_t* B,
                int64_t ldb, acc_t* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    acc_t* c = C + i * ldc;
    std::fill(c, c + N, acc_t(0));
    for (int64_t k = 0; k < K; ++k) {
      const acc_t a = A[i * lda + k];
      const acc_t* b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

template <typename acc_t>
void accumulate_outer(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const acc_t* B,
                      int64_t ldb, acc_t* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    const acc_t* b = B + i * ldb;
    for (int64_t j = 0; j < N; ++j) {
      const acc_t a = A[i * lda + j];
      acc_t* c = C + j * ldc;
      for (int64_t k = 0; k < K; ++k) c[k] += a * b[k];
    }
  }
}

// Columns of a row that epilogue_row finishes at a time, in stack buffers that stay in L1.
constexpr int64_t kEpilogueChunk = 256;

// dst[k] = src[k] as Out (not acc_t) for k < n: bf16 and float16 rounded (to nearest even) by
// narrow_row.
template <typename acc_t, typename Out>
void store_row(const acc_t* __restrict src, Out* __restrict dst, int64_t n) {
  if constexpr (std::is_same_v<acc_t, float> && !std::is_same_v<Out, double>) {
    narrow_row(src, 1.0f, dst, n);
  } else {
    for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<Out>(src[k]);
  }
}

// dst[0 : bytes) = src[0 : bytes), with non-temporal stores from dst's first 32-byte boundary
// (OutputEpilogue::stream_out) where AVX is available, plain copies for the rest; the caller
// ends its rows with end_streams.
inline void stream_bytes(const void* __restrict src, void* __restrict dst, int64_t bytes) {
  const char* from = static_cast<const char*>(src);
  char* to = static_cast<char*>(dst);
#if defined(__AVX__)
  const int64_t head = std::min<int64_t>(bytes, (32 - reinterpret_cast<uintptr_t>(to) % 32) % 32);
  std::memcpy(to, from, static_cast<size_t>(head));
  int64_t b = head;
  for (; b + 32 <= bytes; b += 32) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from + b));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(to + b), bits);
  }
  from += b;
  to += b;
  bytes -= b;
#endif
  std::memcpy(to, from, static_cast<size_t>(bytes));
}

// Orders the non-temporal stores of an epilogue before whatever the thread does next (another
// thread may read the output once this one has finished).
template <typename acc_t>
void end_streams(const OutputEpilogue<acc_t>& e) {
#if defined(__AVX__)
  if (e.stream_out) _mm_sfence();
#endif
}

// out[k] = res[k] + factor[k] * (u[k] + bias[k]) for k < K (OutputEpilogue), a chunk of columns
// at a time (in place in out where it is acc_t), each step one loop with the tests of the optional
// operands outside it, so that every loop vectorises; 16-bit residuals and outputs convert by
// convert_rows.h, and a streamed output (stream) leaves by stream_bytes. The one loop with the
// tests inside that this replaced stayed scalar: 9% of the samples of a fp32 training step on the
// BLAS kernels (the AMD EPYC with AVX2, N = 320, d = 4096, r = 64, under perf).
template <typename acc_t, typename Res, typename Out>
void epilogue_row(const acc_t* __restrict u, int64_t K, const Res* __restrict res, const acc_t* __restrict bias,
                  acc_t scale, const uint8_t* __restrict keep, Out* __restrict out, bool stream) {
  alignas(64) acc_t v[kEpilogueChunk];
  alignas(64) acc_t base[kEpilogueChunk];
  alignas(64) Out narrow[std::is_same_v<Out, acc_t> ? 1 : kEpilogueChunk];
  for (int64_t k0 = 0; k0 < K; k0 += kEpilogueChunk) {
    const int64_t n = std::min(kEpilogueChunk, K - k0);
    const acc_t* uc = u + k0;
    const acc_t* bc = bias == nullptr ? nullptr : bias + k0;
    const uint8_t* kc = keep == nullptr ? nullptr : keep + k0;
    acc_t* __restrict y = v;
    if constexpr (std::is_same_v<Out, acc_t>) {
      if (!stream) y = out + k0;
    }
    if (bc != nullptr && kc != nullptr) {
      for (int64_t k = 0; k < n; ++k) y[k] = (kc[k] ? scale : acc_t(0)) * (uc[k] + bc[k]);
    } else if (bc != nullptr) {
      for (int64_t k = 0; k < n; ++k) y[k] = scale * (uc[k] + bc[k]);
    } else if (kc != nullptr) {
      for (int64_t k = 0; k < n; ++k) y[k] = (kc[k] ? scale : acc_t(0)) * uc[k];
    } else {
      for (int64_t k = 0; k < n; ++k) y[k] = scale * uc[k];
    }
    if (res != nullptr) {
      const acc_t* r = base;
      if constexpr (std::is_same_v<Res, acc_t>) {
        r = res + k0;
      } else {
        widen_row(res + k0, base, n);
      }
      for (int64_t k = 0; k < n; ++k) y[k] = r[k] + y[k];
    }
    if constexpr (std::is_same_v<Out, acc_t>) {
      if (stream) stream_bytes(v, out + k0, n * static_cast<int64_t>(sizeof(Out)));
    } else if (stream) {
      store_row(v, narrow, n);
      stream_bytes(narrow, out + k0, n * static_cast<int64_t>(sizeof(Out)));
    } else {
      store_row(v, out + k0, n);
    }
  }
}

// Row i of an output: out row i = epilogue(u), u the row's K products.
template <typename acc_t>
void finish_row(int64_t i, const acc_t* u, int64_t K, const OutputEpilogue<acc_t>& e) {
  with_type(e.out_kind, [&](auto out_tag) {
    using Out = decltype(out_tag);
    with_type(e.res_kind, [&](auto res_tag) {
      using Res = decltype(res_tag);
      const Res* res = e.res == nullptr ? nullptr : static_cast<const Res*>(e.res) + e.res_row(i) * e.ld_res;
      const uint8_t* keep = e.keep == nullptr ? nullptr : e.keep + i * e.ld_keep;
      epilogue_row(u, K, res, e.bias, e.scale, keep, static_cast<Out*>(e.out) + e.out_row(i) * e.ld_out,
                   e.stream_out);
    });
  });
}

template <typename acc_t>
void project_out(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const acc_t* B,
                 int64_t ldb, const OutputEpilogue<acc_t>& e) {
  std::vector<acc_t> u(K);
  for (int64_t i = 0; i < M; ++i) {
    std::fill(u.begin(), u.end(), acc_t(0));
    for (int64_t j = 0; j < N; ++j) {
      const acc_t a = A[i * lda + j];
      const acc_t* b = B + j * ldb;
      for (int64_t k = 0; k < K; ++k) u[k] += a * b[k];
    }
    finish_row(i, u.data(), K, e);
  }
  end_streams(e);
}

void dropout_keep(uint64_t seed, uint32_t threshold, int64_t row0, int64_t M, int64_t d,
                  uint8_t* keep, int64_t ld_keep) {
  for (int64_t i = 0; i < M; ++i) {
    const uint64_t row = static_cast<uint64_t>(row0 + i);
    for (int64_t k = 0; k < d; k += 4) {
      const auto words = philox::words(seed, static_cast<uint32_t>(k / 4), static_cast<uint32_t>(row),
                                       static_cast<uint32_t>(row >> 32));
      for (int64_t j = 0; j < 4 && k + j < d; ++j) keep[i * ld_keep + k + j] = words[j] >= threshold;
    }
  }
}

template <typename acc_t>
void sum_rows(int64_t M, int64_t K, const acc_t* A, int64_t lda, acc_t* sums) {
  std::fill(sums, sums + K, acc_t(0));
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t k = 0; k < K; ++k) sums[k] += A[i * lda + k];
  }
}

// The stored operand's rows widened one at a time into a row buffer, or read in place when it is
// stored as acc_t.
template <typename acc_t>
void project_in_stored(int64_t M, int64_t N, int64_t K, const void* A, Kind a_kind, int64_t lda, const acc_t* B,
                       int64_t ldb, acc_t* C, int64_t ldc) {
  with_type(a_kind, [&](auto t) {
    using Ta = decltype(t);
    const Ta* a = static_cast<const Ta*>(A);
    if constexpr (std::is_same_v<Ta, acc_t>) {
      project_in(M, N, K, a, lda, B, ldb, C, ldc);
    } else {
      std::vector<acc_t> row(static_cast<size_t>(K));
      for (int64_t i = 0; i < M; ++i) {
        for (int64_t k = 0; k < K; ++k) row[k] = static_cast<acc_t>(a[i * lda + k]);
        project_in(1, N, K, row.data(), K, B, ldb, C + i * ldc, ldc);
      }
    }
  });
}

// The M rows are summed from zero, then added to C (as by the AVX-512 kernels), so a sum over
// blocks is the same whether the blocks were accumulated into one C or summed apart and added.
template <typename acc_t>
void accumulate_outer_stored(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const void* B,
                             Kind b_kind, int64_t ldb, acc_t* C, int64_t ldc, acc_t* sums, bool accumulate) {
  std::vector<acc_t> block(accumulate ? N * K : 0);
  acc_t* out = accumulate ? block.data() : C;
  const int64_t ld_out = accumulate ? K : ldc;
  for (int64_t j = 0; j < N; ++j) std::fill(out + j * ld_out, out + j * ld_out + K, acc_t(0));
  with_type(b_kind, [&](auto t) {
    using Tb = decltype(t);
    const Tb* b = static_cast<const Tb*>(B);
    if constexpr (std::is_same_v<Tb, acc_t>) {
      accumulate_outer(M, N, K, A, lda, b, ldb, out, ld_out);
      if (sums != nullptr) sum_rows(M, K, b, ldb, sums);
    } else {
      std::vector<acc_t> row(static_cast<size_t>(K));
      if (sums != nullptr) std::fill(sums, sums + K, acc_t(0));
      for (int64_t i = 0; i < M; ++i) {
        for (int64_t k = 0; k < K; ++k) row[k] = static_cast<acc_t>(b[i * ldb + k]);
        accumulate_outer(1, N, K, A + i * lda, lda, row.data(), K, out, ld_out);
        if (sums != nullptr) {
          for (int64_t k = 0; k < K; ++k) sums[k] += row[k];
        }
      }
    }
  });
  if (accumulate) {
    for (int64_t j = 0; j < N; ++j) {
      for (int64_t k = 0; k < K; ++k) C[j * ldc + k] += block[j * K + k];
    }
  }
}

template <typename acc_t>
void transpose(int64_t M, int64_t K, const acc_t* A, int64_t lda, acc_t* B) {
  copy_matrix(A, lda, 1, M, K, /*transpose=*/true, B, [](acc_t v) { return v; });
}

template <typename acc_t>
void widen_transposed(int64_t M, int64_t K, const void* A, Kind a_kind, int64_t lda, acc_t* B) {
  with_type(a_kind, [&](auto t) {
    using Ta = decltype(t);
    copy_matrix(static_cast<const Ta*>(A), lda, 1, M, K, /*transpose=*/true, B,
                [](Ta v) { return static_cast<acc_t>(v); });
  });
}

template <typename acc_t>
void project_nt(int64_t M, int64_t N, int64_t K, const void* A, Kind a_kind, int64_t lda, const void* B, Kind b_kind,
                int64_t ldb, acc_t* C, int64_t ldc) {
  with_type(a_kind, [&](auto ta) {
    using Ta = decltype(ta);
    with_type(b_kind, [&](auto tb) {
      using Tb = decltype(tb);
      for (int64_t i = 0; i < M; ++i) {
        const Ta* a = static_cast<const Ta*>(A) + i * lda;
        for (int64_t j = 0; j < N; ++j) {
          const Tb* b = static_cast<const Tb*>(B) + j * ldb;
          acc_t sum = 0;
          for (int64_t k = 0; k < K; ++k) sum += static_cast<acc_t>(a[k]) * static_cast<acc_t>(b[k]);
          C[i * ldc + j] = sum;
        }
      }
    });
  });
}

template <typename acc_t>
void project_out_nt(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const void* B, Kind b_kind,
                    int64_t ldb, const OutputEpilogue<acc_t>& e) {
  std::vector<acc_t> u(K);
  for (int64_t i = 0; i < M; ++i) {
    project_nt<acc_t>(1, K, N, A + i * lda, kAccKind<acc_t>, lda, B, b_kind, ldb, u.data(), K);
    finish_row(i, u.data(), K, e);
  }
  end_streams(e);
}

}  // namespace

template <typename acc_t>
void finish_rows(int64_t M, int64_t K, const acc_t* u, int64_t ldu, int64_t col0, const OutputEpilogue<acc_t>& e) {
  const OutputEpilogue<acc_t> columns = e.from_column(col0);
  for (int64_t i = 0; i < M; ++i) finish_row(i, u + i * ldu, K, columns);
  end_streams(e);
}

template <typename acc_t>
const BlockKernels<acc_t>& kernels() {
  static const BlockKernels<acc_t> table{"generic", &project_in<acc_t>, &accumulate_outer<acc_t>,
                                         &project_out<acc_t>, &transpose<acc_t>, &dropout_keep,
                                         &project_in_stored<acc_t>, &accumulate_outer_stored<acc_t>,
                                         &widen_transposed<acc_t>, &project_nt<acc_t>,
                                         &project_out_nt<acc_t>};
  return table;
}

template const BlockKernels<float>& kernels<float>();
template const BlockKernels<double>& kernels<double>();
template void finish_rows<float>(int64_t, int64_t, const float*, int64_t, int64_t, const OutputEpilogue<float>&);
template void finish_rows<double>(int64_t, int64_t, const double*, int64_t, int64_t, const OutputEpilogue<double>&);

}  // namespace adapterfast::cpu::generic
