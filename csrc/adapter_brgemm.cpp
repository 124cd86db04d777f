// The 16-bit drivers (see adapter_brgemm.h). Per block of kBlockRows rows (fewer in a forward with
// few blocks per thread, forward_block_rows, and in a backward balanced over its reduction groups,
// brgemm_backward_block_rows):
//   forward:  h = x Wd^T (brgemm, K = d) + bd;  a = act(h) in T;  then per chunk of output
//             columns u = a Wu^T (brgemm, K = r) and y = res + s * keep * (u + bu) (finish_rows).
//   backward: gz = g (no dropout; the factor s is folded into dh and applied to dw_up once at the
//             end) or round(g * keep * s);  da = gz Wu (brgemm, K = d);  dh = s' da act'(h);
//             dx = dh Wd (brgemm, K = r) + g;  and per run of up to kSumRows rows (consecutive
//             blocks of one reduction group) dw_up^T += a^T gz and dw_down += dh^T x (brgemm,
//             K = the run's rows, gz and x rows repacked in brgemm's B layout). Summing 128 rows
//             per call rather than 64 halves the [r, d] fp32 partials' trips through L2 (read and
//             written per call); more rows overflow L2 with the repacked panels (kSumRows).
//             While a block's dx (backward) or u (forward) products run, the next block's input
//             rows are prefetched into L2 (prefetch_rows), so that their reads overlap the
//             matrix unit's work.
//             A group's weight-gradient sums are its partials row, blocked by column chunk
//             (ColumnBlocked), so brgemm's C rows are kOutCols floats apart rather than d
//             (d = 1024 put every C tile row on one 4 KiB-aliased cache set: the dW products ran
//             at under half the rate of the others); the groups are summed in that layout and
//             the gradients written from it (adapter_backward.cpp). On AVX512-BF16
//             without AMX, the d-wide B operands
//             (packed weights, repacked rows) have rows padded by 16 columns where d % 512 == 0
//             (b_stride: otherwise their loads along K fall on one or two L1 sets).
// float16 split into bf16 (U = bf16 for T = float16, bf16_split.h): products with K = d (h, da)
// take three calls on split rows; products with K = r (u, dx) one call on rows [hi | hi | lo]
// against weights packed [hi; lo; hi]; the weight gradients one call per full run on B operands
// written [hi; lo; hi] by split_rows_vnni (three calls for a group's shorter last run).
// Contractions over an odd length are padded with one zero (brgemm's 16-bit layouts pair K).
// Bias gradients: unrounded fp32 values summed in fp32 within a 64-row block, and block sums in
// float64, so the error does not grow with N. Outputs (y, dx) past stream_output's sizes are
// written with non-temporal stores, as the fp32 drivers do.
#include "adapter_brgemm.h"

#include <array>
#include <type_traits>
#include <vector>

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "bf16_split.h"
#include "block_kernels.h"
#include "dx_epilogue.h"
#include "parallel_tasks.h"
#include "philox.h"
#include "scratch.h"

namespace adapterfast::cpu {
namespace {

using at::native::cpublas::brgemm;
using at::native::cpublas::brgemm_release;

// Rows per weight-gradient brgemm call (a multiple of kBlockRows). 128 rather than 256: the run's
// repacked gz and x panels (2 x 128 x d bf16: 512 KiB at d = 1024) then stay in a 2 MiB L2 next to
// the [r, d] fp32 sums (512 KiB at r = 64) and the packed weights. Measured once, with the row
// count and the prefetch behind a temporary environment switch, on a scratch loop of 1-thread
// backward calls (least thread time; Intel Xeon with AMX-BF16, 2-core VM at load average 4-6,
// medians of 4-5 alternating processes): d=1024 r=64 19.1 ms (128 rows, prefetch) vs 20.0 ms
// (128, none), 20.8 ms (256, prefetch), 21.7 ms (256, none: the code before); d=4096 r=16 61 ms
// (128) vs 68 ms (256) and 64 ms (64 rows); d=768 r=64 within the noise.
constexpr int64_t kSumRows = 2 * kBlockRows;

// brgemm's 16-bit kernels take B in the layout of brgemm_layout (is_vnni = true); fp32 plain.
template <typename U>
constexpr bool kVnni = !std::is_same_v<U, float>;

// The drivers run on inputs of T with brgemm operands of U: U = T, or U = bf16 for T = float16
// split into bf16 hi + lo (bf16_split.h: three bf16 products per float16 product).
template <typename T, typename U>
constexpr bool kSplit = !std::is_same_v<T, U>;

inline int64_t even(int64_t v) { return v + (v & 1); }

// Rows [row0, row0 + m) of a [*, d] tensor of T as a brgemm A operand: in place when columns are
// contiguous, rows do not overlap and d is even; else copied into scratch (width even(d), the
// pad column zero).
template <typename T>
const T* a_rows(const T* data, int64_t row_stride, int64_t col_stride, int64_t d, int64_t row0,
                int64_t m, T* scratch, int64_t& ld) {
  const T* first = data + row0 * row_stride;
  if (col_stride == 1 && row_stride >= d && d % 2 == 0) {
    ld = row_stride;
    return first;
  }
  ld = even(d);
  for (int64_t i = 0; i < m; ++i) {
    const T* src = first + i * row_stride;
    T* dst = scratch + i * ld;
    for (int64_t k = 0; k < d; ++k) dst[k] = src[k * col_stride];
    if (ld != d) dst[d] = T(0.0f);
  }
  return scratch;
}

// Rows [first, first + m) of a [*, ld] matrix of T (width d, unit column stride): part `part` of
// `parts` of their cache lines prefetched into L2. The drivers spread the next block's input rows
// over the current block's products, so that their reads from L3 or memory overlap the matrix
// unit's work instead of stalling the epilogues and repacks that would otherwise read them first.
template <typename T>
void prefetch_rows(const T* data, int64_t ld, int64_t first, int64_t m, int64_t d, int64_t part, int64_t parts) {
  if (data == nullptr || m <= 0) return;
  constexpr int64_t kLine = 64 / sizeof(T);
  const int64_t per_row = (d + kLine - 1) / kLine;
  const int64_t total = m * per_row;
  const T* rows = data + first * ld;
  for (int64_t l = total * part / parts, end = total * (part + 1) / parts; l < end; ++l) {
    __builtin_prefetch(rows + (l / per_row) * ld + (l % per_row) * kLine, 0, 2);
  }
}

// C[M, d] (+)= A[M, K] B[K, d] in column chunks of kOutCols, B packed with leading dimension ldb;
// with `finish`, each chunk goes through the output epilogue instead of into C. between(c, chunks)
// runs after chunk c of `chunks` (the callers' prefetches).
template <typename T, typename Between>
void product_by_columns(BrgemmLayout layout, int64_t M, int64_t K, int64_t d, const T* A, int64_t lda,
                        const T* B, int64_t ldb, float* C, int64_t ldc, bool add, float* chunk,
                        const OutputEpilogue<float>* finish, Between between) {
  const int64_t chunks = (d + kOutCols - 1) / kOutCols;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t n0 = c * kOutCols;
    const int64_t nc = std::min(kOutCols, d - n0);
    const T* b = B + b_column(layout, n0);
    if (finish != nullptr) {
      brgemm(M, nc, K, lda, ldb, nc, false, A, b, chunk, kVnni<T>);
      avx512::finish_rows(M, nc, chunk, nc, n0, *finish);
    } else {
      brgemm(M, nc, K, lda, ldb, ldc, add, A, b, C + n0, kVnni<T>);
    }
    between(c, chunks);
  }
}

// An [rows, d] fp32 matrix stored as consecutive [rows, nc] blocks, one per chunk of kOutCols
// columns (the last chunk narrower): the C operand of the weight-gradient products. F is float,
// or const float for reading one back.
template <typename F>
struct ColumnBlocked {
  int64_t rows, d;
  F* data;
  F* chunk(int64_t n0) const { return data + rows * n0; }
};

// The two [r, d] weight-gradient sums at the start of a partials row (Partials: dw_up^T, then
// dw_down), each column-blocked.
template <typename F>
std::array<ColumnBlocked<F>, 2> blocked_sums(F* row, int64_t r, int64_t d) {
  return {ColumnBlocked<F>{r, d, row}, ColumnBlocked<F>{r, d, row + r * d}};
}

// C (+)= A[M, K] B[K, d], B packed with leading dimension ldb, C column-blocked.
template <typename T>
void accumulate_by_columns(BrgemmLayout layout, int64_t M, int64_t K, int64_t d, const T* A, int64_t lda,
                           const T* B, int64_t ldb, const ColumnBlocked<float>& C, bool add) {
  for (int64_t n0 = 0; n0 < d; n0 += kOutCols) {
    const int64_t nc = std::min(kOutCols, d - n0);
    brgemm(M, nc, K, lda, ldb, nc, add, A, B + b_column(layout, n0), C.chunk(n0), kVnni<T>);
  }
}

// The same for A and B split into bf16 hi and lo: per chunk a_hi b_hi + a_hi b_lo + a_lo b_hi.
void accumulate_split_by_columns(BrgemmLayout layout, int64_t M, int64_t K, int64_t d, const c10::BFloat16* a_hi,
                                 const c10::BFloat16* a_lo, int64_t lda, const c10::BFloat16* b_hi,
                                 const c10::BFloat16* b_lo, const ColumnBlocked<float>& C, bool add) {
  for (int64_t n0 = 0; n0 < d; n0 += kOutCols) {
    const int64_t nc = std::min(kOutCols, d - n0);
    const int64_t col = b_column(layout, n0);
    brgemm(M, nc, K, lda, d, nc, add, a_hi, b_hi + col, C.chunk(n0), true);
    brgemm(M, nc, K, lda, d, nc, true, a_hi, b_lo + col, C.chunk(n0), true);
    brgemm(M, nc, K, lda, d, nc, true, a_lo, b_hi + col, C.chunk(n0), true);
  }
}

// The weight gradients of a backward of one run, columns [n_lo, n_hi): per chunk of kOutCols
// columns dw_up^T = a^T gz, then dw_down = dh^T x (brgemm, K = the run's rows; A operands [r, K]
// with leading dimension lda, B the run's repacked gz and x rows) into `scratch` (r kOutCols
// floats), each written from there into its gradient (WeightGradients) while it is in L2: the
// same products as accumulate_by_columns into a partials row, without the [r, d] fp32 sums' trips
// through memory and the caller's second pass over them.
template <typename U>
void write_gradients_by_chunks(BrgemmLayout layout, int64_t r, int64_t K, int64_t n_lo, int64_t n_hi, const U* a_t,
                               const U* dh_t, int64_t lda, const U* gz_b, const U* x_b, int64_t ldb, float* scratch,
                               WeightGradients& gradients) {
  for (int64_t n0 = n_lo; n0 < n_hi; n0 += kOutCols) {
    const int64_t nc = std::min(kOutCols, n_hi - n0);
    const int64_t col = b_column(layout, n0);
    brgemm(r, nc, K, lda, ldb, nc, false, a_t, gz_b + col, scratch, kVnni<U>);
    gradients.write_up(scratch, n0, nc);
    brgemm(r, nc, K, lda, ldb, nc, false, dh_t, x_b + col, scratch, kVnni<U>);
    gradients.write_down(scratch, n0, nc);
  }
}

// The weight src (K x N, as for pack_b) as a B operand of U with leading dimension ldb: for the
// split, [hi; lo; hi] of pack_b_split (whose ldb is always N).
template <typename T, typename U>
Scratch<U> weight_b(BrgemmLayout layout, int64_t K, int64_t N, const float* src, int64_t ld_k, int64_t ldb) {
  if constexpr (kSplit<T, U>) {
    return pack_b_split(layout, K, N, src, ld_k);
  } else {
    return pack_b<U>(layout, K, N, src, ld_k, ldb);
  }
}

// Leading dimension of the B operands that are d columns wide (the packed up-weight of the
// forward, the down-weight of the backward, the backward's repacked gz and x rows): d, or d + 16
// where d is a multiple of 512 on the AVX512-BF16 kernel (VNNI pairs of rows then lie a multiple
// of 2 KiB apart, so the kernel's loads of B along K fall on one or two L1 sets). oneDNN's
// AVX512-BF16 ukernel, `python -m benchmarks.brgemm_calls --dtype bf16 --shapes 768,64 1024,64
// 4096,16` (1 thread, least thread time, AMD EPYC Zen 4 without AMX, load 1.1-1.6): u/dx calls
// (M = 64, K = 64, 256 columns) at d = 1024 176 -> 217 GFLOP/s with ldb = 1040; at d = 4096,
// r = 16 171 -> 187; weight-gradient calls (K = 256 rows) 220 -> 229 (d = 1024, r = 64) and
// 162 -> 220 (d = 4096, r = 16); d = 768 (pairs 3 KiB apart) 221 / 231 either way. AMX tiles
// load B rows with their own stride and were not measured here, so AMX keeps ldb = d; float16's
// plain layout (AVX512-FP16) too. Whole 1-thread backward calls, this build against the one before
// in alternating processes (4 pairs, least thread time of 10 calls each, load average 1.9-2.4):
// d = 1024, r = 64 30.8 -> 27.3 ms (best of each; every pair faster, by 1-12%), d = 4096, r = 16
// 46.5 -> 44.6 ms (every pair faster, 4-11%); forwards within noise.
// ADAPTERFAST_CPU_BRGEMM_PAD=1 pads every such VNNI operand (any d, AMX too), =0 none: to measure
// the choice where it was not. `python -m benchmarks.cpu_paths --dtype bf16 --paths
// default,brgemm-no-pad,brgemm-pad --threads 1 --clock thread --repeats 3 --calls 10 --shapes
// 8192,1024,64 8192,4096,16 8192,768,64` (same CPU, load average 2.8-3.1; output in
// benchmarks/results/cpu_16bit/avx512bf16_bf16_paths.txt), backward, no pad vs pad by round:
// d = 1024, r = 64 32.0/29.9, 30.4/27.8, 33.3/27.2 ms; d = 4096, r = 16 54.8/54.4, 54.6/45.4,
// 59.5/53.0; but d = 768, r = 64 21.7/29.3, 23.8/25.9, 22.1/24.8: padding where the rows do not
// alias costs, hence only d % 512 == 0.
int64_t b_stride(BrgemmLayout layout, int64_t d) {
  static const int forced = env_is("ADAPTERFAST_CPU_BRGEMM_PAD", "1")   ? 1
                            : env_is("ADAPTERFAST_CPU_BRGEMM_PAD", "0") ? 0
                                                                         : -1;
  if (layout != BrgemmLayout::vnni || forced == 0) return d;
  return forced == 1 || (!bf16_on_amx_tiles() && d % 512 == 0) ? d + 16 : d;
}

using Bf16 = c10::BFloat16;

// Rows [0, m) of src (width K, leading dimension ld_src) split into hi and lo rows of width
// even(K), the pad column zero.
void split_rows(int64_t m, int64_t K, const c10::Half* src, int64_t ld_src, Bf16* hi, Bf16* lo) {
  const int64_t kp = even(K);
  for (int64_t i = 0; i < m; ++i) {
    split_half(src + i * ld_src, K, hi + i * kp, lo + i * kp);
    if (kp != K) hi[i * kp + K] = lo[i * kp + K] = Bf16(0.0f);
  }
}

// Rows [0, m) of src (width K <= kp) split into rows [hi | hi | lo] of dst, each part kp wide
// (the A operand for pack_b_split's [hi; lo; hi]); the pad columns of dst are left as they are
// (the callers keep them zero).
void split_rows_tripled(int64_t m, int64_t K, int64_t kp, const c10::Half* src, int64_t ld_src, Bf16* dst) {
  for (int64_t i = 0; i < m; ++i) {
    Bf16* row = dst + i * 3 * kp;
    split_half(src + i * ld_src, K, row, row + 2 * kp);
    std::copy(row, row + K, row + kp);
  }
}

// C[m, N] = A B over K = kp with A split into hi, lo (leading dimension kp) and B the first two
// segments of pack_b_split (ldb = N): a_hi b_hi + a_hi b_lo + a_lo b_hi, three calls on the small C.
void product_split(int64_t m, int64_t N, int64_t kp, const Bf16* hi, const Bf16* lo, const Bf16* B, float* C) {
  brgemm(m, N, kp, kp, N, N, false, hi, B, C, true);
  brgemm(m, N, kp, kp, N, N, true, hi, B + kp * N, C, true);
  brgemm(m, N, kp, kp, N, N, true, lo, B, C, true);
}

// The 16-bit weight w [P, Q] as given (contiguous, U = its type) as the VNNI B operand of a
// product with K rows and N columns, ldb >= N (pad columns zero): B[k, n] = w[k, n] (K = P) or,
// with `transpose`, w[n, k] (K = Q); weight_as_b (brgemm.h).
template <typename U>
Scratch<U> given_weight_b(const at::Tensor& w, bool transpose, int64_t ldb) {
  const int64_t P = w.size(0);
  const int64_t Q = w.size(1);
  const int64_t K = transpose ? Q : P;
  const int64_t N = transpose ? P : Q;
  // weight_as_b writes every element but the pad columns, which brgemm reads as zeros.
  Scratch<U> out = ldb == N ? Scratch<U>(even(K) * ldb) : Scratch<U>::zeroed(even(K) * ldb);
  weight_as_b<U>(BrgemmLayout::vnni, P, Q, w.data_ptr<U>(), transpose, out.data(), ldb);
  return out;
}

// The float16 weight w as given, as the split B operand [hi; lo; hi] of pack_b_split (ldb = N):
// its VNNI operand (given_weight_b), whose values split into hi and lo in the same layout.
Scratch<Bf16> given_weight_split(const at::Tensor& w, bool transpose) {
  const int64_t K = transpose ? w.size(1) : w.size(0);
  const int64_t N = transpose ? w.size(0) : w.size(1);
  const int64_t size = even(K) * N;
  const Scratch<c10::Half> b = given_weight_b<c10::Half>(w, transpose, N);
  Scratch<Bf16> out(3 * size);
  split_half(b.data(), size, out.data(), out.data() + size);
  std::copy(out.data(), out.data() + size, out.data() + 2 * size);
  return out;
}

// A weight's B operand (K x N, as for weight_b): from the weight as given where the driver packs
// it itself (given defined, packs_given_weights), else from its accumulation-type operand `acc`
// (K x N, element (k, n) at acc[k * N + n]). `transpose`: the given weight is B^T.
template <typename T, typename U>
Scratch<U> weight_operand(BrgemmLayout layout, const at::Tensor& acc, const at::Tensor& given, bool transpose,
                          int64_t K, int64_t N, int64_t ldb) {
  if constexpr (std::is_same_v<U, Bf16>) {
    if (given.defined()) {
      if constexpr (kSplit<T, U>) {
        return given_weight_split(given, transpose);
      } else {
        return given_weight_b<Bf16>(given, transpose, ldb);
      }
    }
  }
  return weight_b<T, U>(layout, K, N, acc.data_ptr<float>(), N, ldb);
}

// Whether the drivers pack their two weights side by side (side_by_side): from
// kSideBySideWeightElements elements each in a call of one block of kBlockRows rows, half as many
// in a call of more, whose blocks start only after both packs. A one-block call wakes the threads
// for the packs alone: at d = 1024, r = 64 (2^16) that slowed bf16 inference at N = 1-64 on two
// threads from 23-43 to 54-68 us and did not clearly help at N = 128 (commit c2c8b19). bf16 on the Xeon, two
// threads, eager adapter over adapterfast, training / inference, packs on the calling thread ->
// side by side (`python -m benchmarks.overhead --dtype bf16 --r 64 --threads 2`, a temporary
// switch, two runs each; printed, not saved):
//   d = 4096, r = 64 (2^18): N = 1 0.82x-0.85x / 0.71x-0.84x -> 0.88x-0.89x / 0.85x-0.87x; N = 8
//     0.74x-0.75x / 0.65x-0.76x -> 0.80x / 0.86x-0.87x; N = 64 0.77x-0.78x / 0.72x-0.82x -> 0.83x
//     / 0.91x-1.04x; N = 128 0.92x / 1.25x-1.32x -> 0.98x-1.01x / 1.59x-1.63x;
//   d = 2048, r = 64 (2^17): N = 1-64 within the runs' spread (training 0.94x-1.02x -> 0.91x-1.00x,
//     inference 1.00x-1.25x -> 1.01x-1.30x); N = 128 1.01x-1.03x / 1.38x-1.43x -> 1.08x / 1.63x-1.64x.
bool packs_side_by_side(const Dims& dims) {
  const int64_t bound = dims.n > kBlockRows ? kSideBySideWeightElements / 2 : kSideBySideWeightElements;
  return dims.r * dims.d >= bound;
}

// Rows a brgemm forward thread needs before a second one pays (forward_block_rows): on AMX tiles
// kMinForwardRowsPerThread, as for the fp32 kernels; where brgemm runs on AVX512-BF16 dot products,
// several times slower per product, enough rows for kDotForwardThreadFmas products of each GEMM,
// from a quarter of kMinForwardRowsPerThread (weights of 2^18 elements) up to it (2^16 and fewer).
// bf16, two threads, eager adapter over adapterfast, inference / training, 64 rows a thread ->
// this bound (the AMD EPYC, in one process alternating the two per round, five rounds;
// benchmarks/results/overhead_298c1db_amd.txt): d = 4096, r = 64 (16 rows): N = 32 0.93x /
// 0.64x -> 1.14x / 0.67x, N = 48 0.78x / 0.55x -> 0.95x / 0.62x, N = 64 0.78x / 0.88x -> 1.16x /
// 0.99x, N = 96 0.97x / 0.76x -> 1.22x / 0.82x, N = 127 and 192 within 0.13x either way;
// d = 2048, r = 64 (32 rows): N = 64 0.88x -> 1.00x, N = 96 0.97x -> 1.21x inference, training
// within 0.09x; one thread unchanged. Not measured on AMX, which keeps the fp32 kernels' bound.
constexpr int64_t kDotForwardThreadFmas = int64_t(1) << 22;

int64_t forward_rows_per_thread(const Dims& dims) {
  if (bf16_on_amx_tiles() || dims.d * dims.r == 0) return kMinForwardRowsPerThread;
  return std::clamp<int64_t>(kDotForwardThreadFmas / (dims.d * dims.r), kMinForwardRowsPerThread / 4,
                             kMinForwardRowsPerThread);
}

template <typename T, typename U>
void forward_impl(const ForwardOperands& op, BrgemmLayout layout, at::Tensor& y, at::Tensor& h) {
  constexpr bool split = kSplit<T, U>;
  const auto [n, d, r] = op.dims;
  const int64_t rp = even(r);
  const int64_t dp = even(d);
  const int64_t ldb = split ? d : b_stride(layout, d);
  Scratch<U> w_down_b, w_up_b;
  side_by_side(packs_side_by_side(op.dims),
               [&] { w_down_b = weight_operand<T, U>(layout, op.w_down_t, op.w_down_given, true, d, r, r); },
               [&] { w_up_b = weight_operand<T, U>(layout, op.w_up_t, op.w_up_given, true, r, d, ldb); });
  const T* x_data = op.x.data_ptr<T>();
  const int64_t x_row_stride = op.x.stride(0);
  const int64_t x_col_stride = d == 1 ? 1 : op.x.stride(1);
  const float* b_down = op.b_down ? op.b_down->data_ptr<float>() : nullptr;
  float* h_data = h.data_ptr<float>();
  T* y_data = y.data_ptr<T>();
  const bool dropout = op.dropout_p > 0.0;
  const uint32_t threshold = philox::threshold(op.dropout_p);
  const int64_t ld_keep = keep_row_bytes(d);
  const BlockKernels<float>& kernels = block_kernels<float>();

  const OutputEpilogue<float> epilogue = forward_epilogue<float>(op, y);

  const int64_t rows = forward_block_rows(n, /*granule=*/16, forward_rows_per_thread(op.dims));
  const int64_t blocks = (n + rows - 1) / rows;
  parallel_tasks(blocks, [&](TaskQueue& tasks) {
    Scratch<T> x_scratch(kBlockRows * dp);
    Scratch<T> a = Scratch<T>::zeroed(kBlockRows * rp);                              // its pad column read as 0
    Scratch<U> x_split = Scratch<U>::zeroed(split ? 2 * kBlockRows * dp : 0);        // x rows' hi, then lo
    Scratch<U> a_split = Scratch<U>::zeroed(split ? kBlockRows * 3 * rp : 0);        // rows [a_hi | a_hi | a_lo]
    Scratch<float> chunk(kBlockRows * kOutCols);
    Scratch<uint8_t> keep(dropout ? kBlockRows * ld_keep : 0);
    Scratch<float> act_row(r);
    OutputEpilogue<float> e = epilogue;
    for (int64_t block = tasks.next(); block >= 0; block = tasks.next()) {
      const int64_t row0 = block * rows;
      const int64_t m = std::min(rows, n - row0);
      int64_t ld_x = 0;
      const T* xb = a_rows(x_data, x_row_stride, x_col_stride, d, row0, m, x_scratch.data(), ld_x);
      float* hb = h_data + row0 * r;
      if constexpr (split) {
        split_rows(m, d, xb, ld_x, x_split.data(), x_split.data() + kBlockRows * dp);
        product_split(m, r, dp, x_split.data(), x_split.data() + kBlockRows * dp, w_down_b.data(), hb);
      } else {
        brgemm(m, r, dp, ld_x, r, r, false, xb, w_down_b.data(), hb, kVnni<U>);
      }
      visit<float>(op.activation, [&](auto f) {
        for (int64_t i = 0; i < m; ++i) {
          float* h_row = hb + i * r;
          for (int64_t j = 0; j < r; ++j) {
            if (b_down != nullptr) h_row[j] += b_down[j];
            act_row[j] = f.value(h_row[j]);
          }
          narrow_row(act_row.data(), 1.0f, a.data() + i * rp, r);
        }
      });
      if (dropout) kernels.dropout_keep(op.seed, threshold, row0, m, d, keep.data(), ld_keep);
      e.keep = dropout ? keep.data() : nullptr;
      if (op.residual) {
        e.res = static_cast<const char*>(op.residual->data_ptr()) +
                row0 * op.residual->stride(0) * op.residual->element_size();
      } else if (x_col_stride == 1) {
        e.res = x_data + row0 * x_row_stride;
        e.res_kind = kind_of(op.x.scalar_type());
        e.ld_res = x_row_stride;
      } else {
        e.res = xb;
        e.res_kind = kind_of(op.x.scalar_type());
        e.ld_res = ld_x;
      }
      e.out = y_data + row0 * d;
      const int64_t next = row0 + m;
      const int64_t next_m = tasks.next_is(block + 1) ? std::min(rows, n - next) : 0;
      auto prefetch_next = [&](int64_t c, int64_t chunks) {
        if (x_col_stride == 1) prefetch_rows(x_data, x_row_stride, next, next_m, d, c, chunks);
      };
      if constexpr (split) {
        split_rows_tripled(m, r, rp, a.data(), rp, a_split.data());
        product_by_columns<U>(layout, m, 3 * rp, d, a_split.data(), 3 * rp, w_up_b.data(), ldb, nullptr, 0, false,
                              chunk.data(), &e, prefetch_next);
      } else {
        product_by_columns<U>(layout, m, rp, d, a.data(), rp, w_up_b.data(), ldb, nullptr, 0, false, chunk.data(),
                              &e, prefetch_next);
      }
    }
    brgemm_release(kVnni<U>);
  });
}

// Whether a backward of one block (up to kBlockRows rows) spreads its dx and weight-gradient
// products, and the repacks of its g and x rows they read, over the threads by ranges of whole
// kOutCols-column chunks (backward_impl): where brgemm runs on AVX512-BF16 dot products, with
// weights of kSideBySideWeightElements or more and threads to spare. Such a call is one reduction
// group, which one thread ran alone; each chunk's arithmetic stays as it was, so the results are
// bitwise those of one thread. bf16 training on two threads, eager adapter over adapterfast, one
// thread's block -> column ranges (the AMD EPYC, in one process alternating the two per round,
// five rounds, three runs; benchmarks/results/overhead_298c1db_amd.txt): d = 4096, r = 64: N = 8
// 0.86x-0.89x -> 0.94x-0.98x, N = 16 0.78x-0.81x -> 0.87x-0.90x, N = 32 0.42x-0.64x ->
// 0.53x-0.76x, N = 48 0.45x-0.60x -> 0.56x-0.78x, N = 64 0.50x-0.80x -> 0.61x-1.03x. At d = 2048
// and 1024 (weights of 2^17 and 2^16) the changes went both ways (-0.12x to +0.15x, one cell
// 1.30x -> 0.64x), so those stay on one thread. AMX, with products several times cheaper, is left
// as it was (not measured there).
bool backward_by_column_ranges(const Dims& dims) {
  return !bf16_on_amx_tiles() && dims.n <= kBlockRows && dims.r * dims.d >= kSideBySideWeightElements &&
         at::get_num_threads() > 1 && !at::in_parallel_region();
}

template <typename T, typename U>
void backward_impl(const BackwardOperands& op, BrgemmLayout layout, at::Tensor& dx, at::Tensor& partials,
                   at::Tensor& bias_partials, WeightGradients* gradients) {
  constexpr bool split = kSplit<T, U>;
  // The split writes its B operands in the VNNI layout (split_rows_vnni), bf16's on every ISA.
  TORCH_CHECK(!split || layout == BrgemmLayout::vnni, "adapterfast: the float16 split needs bf16's VNNI layout");
  const auto [n, d, r] = op.dims;
  const int64_t rp = even(r);
  const int64_t groups = partials.size(0);
  const int64_t ldb = split ? d : b_stride(layout, d);
  Scratch<U> w_up_b, w_down_b;
  side_by_side(packs_side_by_side(op.dims),
               [&] { w_up_b = weight_operand<T, U>(layout, op.w_up, op.w_up_given, false, d, r, r); },
               [&] { w_down_b = weight_operand<T, U>(layout, op.w_down, op.w_down_given, false, r, d, ldb); });
  const T* g_data = op.grad_y.data_ptr<T>();
  const int64_t ld_g = op.grad_y.stride(0);
  const T* x_data = op.x.data_ptr<T>();
  const int64_t x_row_stride = op.x.stride(0);
  const int64_t x_col_stride = d == 1 ? 1 : op.x.stride(1);
  const float* h_data = op.h.data_ptr<float>();
  T* dx_data = dx.data_ptr<T>();
  const bool dropout = op.dropout_p > 0.0;
  const uint32_t threshold = philox::threshold(op.dropout_p);
  const float factor = static_cast<float>(dropout ? op.scale / (1.0 - op.dropout_p) : op.scale);
  const float fold = dropout ? 1.0f : factor;
  const int64_t ld_keep = keep_row_bytes(d);
  const int64_t rows = brgemm_backward_block_rows(op.dims);
  const int64_t blocks = (n + rows - 1) / rows;
  const BlockKernels<float>& kernels = block_kernels<float>();

  const OutputEpilogue<float> epilogue = dx_epilogue<float>(op.grad_y, ld_g, dx);
  const bool column_ranges = !split && backward_by_column_ranges(op.dims);
  // The one-run route of brgemm_backward_writes_gradients: no partials row.
  const bool direct = gradients != nullptr;
  TORCH_CHECK(!direct || (!split && blocks == 1), "adapterfast: gradients written by chunks need one block, not split");

  const auto body = [&](TaskQueue& tasks) {
    const int64_t dp = even(d);
    Scratch<T> gz(kBlockRows * dp);
    Scratch<T> x_scratch(kBlockRows * dp);
    // A run's gz and x rows as B operands; for the split, three segments of kSumRows rows each,
    // [hi; lo; hi], which a full run multiplies in one call by A rows [a_hi | a_hi | a_lo].
    // Written before they are read (rows_as_b, split_rows_vnni, transpose_rows and the pad row
    // below write every element a product reads), so not zeroed.
    Scratch<U> gz_b((split ? 3 : 1) * kSumRows * ldb);
    Scratch<U> x_b((split ? 3 : 1) * kSumRows * ldb);
    Scratch<T> a_t(r * kSumRows);        // [r, kSumRows]: a^T of the run
    Scratch<T> dh_t(r * kSumRows);       // [r, kSumRows]: dh^T of the run
    Scratch<float> da(kBlockRows * r);
    Scratch<T> dh = Scratch<T>::zeroed(kBlockRows * rp);  // its pad column read as 0
    Scratch<T> a(kBlockRows * r);
    // The split's other operands: a block's gz rows in hi and lo ([m, dp] each); dh as rows
    // [hi | hi | lo]; a^T and dh^T of the run as rows [hi | hi | lo] of 3 kSumRows.
    Scratch<U> rows_split = Scratch<U>::zeroed(split ? 2 * kBlockRows * dp : 0);
    Scratch<U> dh_split = Scratch<U>::zeroed(split ? kBlockRows * 3 * rp : 0);
    Scratch<U> t_split = Scratch<U>::zeroed(split ? 2 * r * 3 * kSumRows : 0);
    const int64_t segment = kSumRows * d;
    U* const rows_hi = rows_split.data();
    U* const rows_lo = rows_split.data() + kBlockRows * dp;
    std::vector<float> dh_sums(r);
    std::vector<float> col_sums(d);
    Scratch<float> chunk(kBlockRows * kOutCols);
    Scratch<float> gradient_chunk(direct && !column_ranges ? r * kOutCols : 0);
    Scratch<uint8_t> keep(dropout ? kBlockRows * ld_keep : 0);
    OutputEpilogue<float> e = epilogue;
    for (int64_t group = tasks.next(); group >= 0; group = tasks.next()) {
      float* row = direct ? nullptr : partials.data_ptr<float>() + group * partials.size(1);
      double* bias_row = bias_partials.data_ptr<double>() + group * bias_partials.size(1);
      std::fill(bias_row, bias_row + bias_partials.size(1), 0.0);
      const Partials<float> sums = direct ? Partials<float>(nullptr, nullptr, bias_row, op.dims)
                                          : Partials<float>(row, bias_row, op.dims);
      const auto [dw_up_sums, dw_down_sums] = direct ? std::array<ColumnBlocked<float>, 2>{} : blocked_sums(row, r, d);
      const int64_t first_block = group * blocks / groups;
      const int64_t last_block = (group + 1) * blocks / groups;
      int64_t run = 0;  // rows (even) collected for the weight gradients
      bool first_run = true;
      for (int64_t block = first_block; block < last_block; ++block) {
        const int64_t row0 = block * rows;
        const int64_t m = std::min(rows, n - row0);
        const int64_t mp = even(m);
        const T* gb = g_data + row0 * ld_g;

        // gz, and its column sums (fp32 within the block, float64 across blocks); without dropout
        // (and not split) the sums are taken where the rows are repacked for dw_up below, so that
        // g is read from memory by the da product only, not first by a separate loop.
        std::fill(col_sums.begin(), col_sums.end(), 0.0f);
        const T* gz_rows = nullptr;
        int64_t ld_gz = 0;
        if (dropout) {
          kernels.dropout_keep(op.seed, threshold, row0, m, d, keep.data(), ld_keep);
          ld_gz = dp;
          for (int64_t i = 0; i < m; ++i) {
            const T* __restrict g = gb + i * ld_g;
            const uint8_t* __restrict kp = keep.data() + i * ld_keep;
            T* __restrict out = gz.data() + i * dp;
            float* __restrict sum = col_sums.data();
            for (int64_t k = 0; k < d; ++k) {
              const float v = static_cast<float>(g[k]) * (kp[k] ? factor : 0.0f);
              sum[k] += v;
              out[k] = static_cast<T>(v);
            }
            if (dp != d) out[d] = T(0.0f);
          }
          gz_rows = gz.data();
        } else {
          if constexpr (split) {
            for (int64_t i = 0; i < m; ++i) add_to_sums(gb + i * ld_g, col_sums.data(), d);
          }
          gz_rows = a_rows(g_data, ld_g, 1, d, row0, m, gz.data(), ld_gz);
        }
        auto add_db_up = [&] {
          if (!dropout) {
            for (float& v : col_sums) v *= factor;
          }
          for (int64_t k = 0; k < d; ++k) sums.db_up[k] += static_cast<double>(col_sums[k]);
        };
        if (split || dropout) add_db_up();

        if constexpr (split) {
          split_rows(m, d, gz_rows, ld_gz, rows_hi, rows_lo);
          product_split(m, r, dp, rows_hi, rows_lo, w_up_b.data(), da.data());
          U* const b = gz_b.data() + run * d;
          split_rows_vnni(m, d, gz_rows, ld_gz, b, b + segment, b + 2 * segment);
        } else {
          brgemm(m, r, dp, ld_gz, r, r, false, gz_rows, w_up_b.data(), da.data(), kVnni<U>);
        }
        const float* hb = h_data + row0 * r;
        std::fill(dh_sums.begin(), dh_sums.end(), 0.0f);
        visit<float>(op.activation, [&](auto f) {
          for (int64_t i = 0; i < m; ++i) {
            const float* __restrict h_row = hb + i * r;
            const float* __restrict da_row = da.data() + i * r;
            T* __restrict dh_row = dh.data() + i * rp;
            T* __restrict a_row = a.data() + i * r;
            float* __restrict sum = dh_sums.data();
            for (int64_t j = 0; j < r; ++j) {
              const float v = backprop(f, h_row[j], fold * da_row[j]);
              sum[j] += v;
              dh_row[j] = static_cast<T>(v);
              a_row[j] = static_cast<T>(f.value(h_row[j]));
            }
          }
        });
        for (int64_t j = 0; j < r; ++j) sums.db_down[j] += static_cast<double>(dh_sums[j]);
        transpose_rows(m, r, dh.data(), rp, dh_t.data() + run, kSumRows);
        transpose_rows(m, r, a.data(), r, a_t.data() + run, kSumRows);
        if (mp != m) {
          for (int64_t j = 0; j < r; ++j) dh_t[j * kSumRows + run + m] = a_t[j * kSumRows + run + m] = T(0.0f);
        }

        e.res = op.residual_is_x ? gb : nullptr;
        e.out = dx_data + row0 * d;
        int64_t ld_x = 0;
        const T* xb = a_rows(x_data, x_row_stride, x_col_stride, d, row0, m, x_scratch.data(), ld_x);
        const int64_t next_m = block + 1 < last_block ? std::min(rows, n - row0 - m) : 0;
        auto prefetch_next = [&](int64_t c, int64_t chunks) {
          prefetch_rows(g_data, ld_g, row0 + m, next_m, d, c, chunks);
          if (x_col_stride == 1) prefetch_rows(x_data, x_row_stride, row0 + m, next_m, d, c, chunks);
        };
        if constexpr (split) {
          split_rows_tripled(m, r, rp, dh.data(), rp, dh_split.data());
          product_by_columns<U>(layout, m, 3 * rp, d, dh_split.data(), 3 * rp, w_down_b.data(), ldb, nullptr, 0,
                                false, chunk.data(), &e, prefetch_next);
          U* const b = x_b.data() + run * d;
          split_rows_vnni(m, d, xb, ld_x, b, b + segment, b + 2 * segment);
        } else if (column_ranges) {
          // The only block, so its run starts at row 0 and ends here: the weight-gradient sums are
          // taken per range too, and the run is done.
          const int64_t chunks = (d + kOutCols - 1) / kOutCols;
          at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
            const int64_t n_lo = c0 * kOutCols;
            const int64_t w = std::min(d, c1 * kOutCols) - n_lo;
            const int64_t col = b_column(layout, n_lo);
            // The dx chunks', then the weight-gradient chunks' products (write_gradients_by_chunks).
            Scratch<float> range_chunk(std::max(kBlockRows, direct ? r : 0) * kOutCols);
            const OutputEpilogue<float> e_range = e.from_column(n_lo);
            product_by_columns<U>(layout, m, rp, w, dh.data(), rp, w_down_b.data() + col, ldb, nullptr, 0, false,
                                  range_chunk.data(), &e_range, [](int64_t, int64_t) {});
            if (dropout) {
              rows_as_b<U>(layout, m, w, gz_rows + n_lo, ld_gz, gz_b.data() + col, nullptr, ldb);
            } else {
              rows_as_b_summed<U>(layout, m, w, gz_rows + n_lo, ld_gz, gz_b.data() + col, col_sums.data() + n_lo, ldb);
              for (int64_t k = n_lo; k < n_lo + w; ++k) sums.db_up[k] += static_cast<double>(col_sums[k] * factor);
            }
            rows_as_b<U>(layout, m, w, xb + n_lo, ld_x, x_b.data() + col, nullptr, ldb);
            if (direct) {
              write_gradients_by_chunks<U>(layout, r, mp, n_lo, n_lo + w, a_t.data(), dh_t.data(), kSumRows,
                                           gz_b.data(), x_b.data(), ldb, range_chunk.data(), *gradients);
            } else {
              accumulate_by_columns<U>(layout, r, mp, w, a_t.data(), kSumRows, gz_b.data() + col, ldb,
                                       ColumnBlocked<float>{r, w, dw_up_sums.data + r * n_lo}, false);
              accumulate_by_columns<U>(layout, r, mp, w, dh_t.data(), kSumRows, x_b.data() + col, ldb,
                                       ColumnBlocked<float>{r, w, dw_down_sums.data + r * n_lo}, false);
            }
            brgemm_release(kVnni<U>);
          });
          first_run = false;
          continue;
        } else {
          product_by_columns<U>(layout, m, rp, d, dh.data(), rp, w_down_b.data(), ldb, nullptr, 0, false,
                                chunk.data(), &e, prefetch_next);
          if (dropout) {
            rows_as_b<U>(layout, m, d, gz_rows, ld_gz, gz_b.data() + run * ldb, nullptr, ldb);
          } else {  // db_up's column sums of g, taken from the block's rows while they are in L2
            rows_as_b_summed<U>(layout, m, d, gz_rows, ld_gz, gz_b.data() + run * ldb, col_sums.data(), ldb);
            add_db_up();
          }
          rows_as_b<U>(layout, m, d, xb, ld_x, x_b.data() + run * ldb, nullptr, ldb);
        }
        run += mp;
        if (block + 1 == last_block || run + even(next_m) > kSumRows) {
          if constexpr (split) {
            constexpr int64_t ld = 3 * kSumRows;
            U* const a3 = t_split.data();
            U* const dh3 = a3 + r * ld;
            split_rows_tripled(r, run, kSumRows, a_t.data(), kSumRows, a3);
            split_rows_tripled(r, run, kSumRows, dh_t.data(), kSumRows, dh3);
            if (run == kSumRows) {
              accumulate_by_columns<U>(layout, r, ld, d, a3, ld, gz_b.data(), d, dw_up_sums, !first_run);
              accumulate_by_columns<U>(layout, r, ld, d, dh3, ld, x_b.data(), d, dw_down_sums, !first_run);
            } else {  // a group's last, shorter run: its segments are not contiguous
              accumulate_split_by_columns(layout, r, run, d, a3, a3 + 2 * kSumRows, ld, gz_b.data(),
                                          gz_b.data() + segment, dw_up_sums, !first_run);
              accumulate_split_by_columns(layout, r, run, d, dh3, dh3 + 2 * kSumRows, ld, x_b.data(),
                                          x_b.data() + segment, dw_down_sums, !first_run);
            }
          } else if (direct) {
            write_gradients_by_chunks<U>(layout, r, run, 0, d, a_t.data(), dh_t.data(), kSumRows, gz_b.data(),
                                         x_b.data(), ldb, gradient_chunk.data(), *gradients);
          } else {
            accumulate_by_columns<U>(layout, r, run, d, a_t.data(), kSumRows, gz_b.data(), ldb, dw_up_sums,
                                     !first_run);
            accumulate_by_columns<U>(layout, r, run, d, dh_t.data(), kSumRows, x_b.data(), ldb, dw_down_sums,
                                     !first_run);
          }
          run = 0;
          first_run = false;
        }
      }
      if (first_run && !direct) std::fill(row, row + partials.size(1), 0.0f);
    }
    brgemm_release(kVnni<U>);
  };
  if (column_ranges) {
    tasks_on_caller(groups, body);
  } else {
    parallel_tasks(groups, body);
  }
}

}  // namespace

template <typename T>
void forward_blocks_brgemm(const ForwardOperands& op, BrgemmLayout layout, at::Tensor& y, at::Tensor& h) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (fp16_route(false, op.dims.n, op.dims.r) == Fp16Route::bf16x3) {
      return forward_impl<T, c10::BFloat16>(op, layout, y, h);
    }
  }
  forward_impl<T, T>(op, layout, y, h);
}

// On AMX tiles kBlockRows rows per block: there the balanced blocks of the block kernels
// (backward_block_rows) measured within the runs' spread for bf16 on two threads (the Xeon,
// d = 4096 and 1024, N = 192 and 448, three runs each). On AVX512-BF16 dot products, several times
// slower per product, the thread with the larger reduction group sets the time, so from
// 2 kBlockRows rows the blocks are balanced_block_rows. bf16 training, blocks of kBlockRows time
// over balanced blocks' time, least / median round, in one process alternately (the AMD EPYC,
// benchmarks/results/overhead_balanced_amd.txt): two threads, d = 4096, r = 64: N = 192
// 1.19x / 1.13x, N = 320 1.07x / 1.08x, N = 448 1.14x / 1.04x, N = 576 1.12x / 1.08x; d = 1024,
// r = 64: N = 192 1.15x / 1.13x, 320 1.11x / 1.14x, 448 1.05x / 1.07x; d = 4096, r = 16: N = 192
// 1.11x / 1.21x, 320 1.08x / 1.05x, 448 1.06x / 1.01x; one thread 0.95x-1.03x; N = 256 (blocks
// unchanged) 0.99x-1.01x.
int64_t brgemm_backward_block_rows(const Dims& dims) {
  return !bf16_on_amx_tiles() && dims.n >= 2 * kBlockRows ? balanced_block_rows(dims) : kBlockRows;
}

// bf16 training, the module step's time with the partials row and the caller's pass over it over
// its time with the gradients written by chunks, least / median round, in one process alternately
// (the AMD EPYC, freed memory kept as benchmarks.overhead keeps it;
// benchmarks/results/overhead_balanced_amd.txt): d = 4096, r = 64, two threads: N = 8 1.11x / 1.11x,
// N = 16 1.05x / 1.07x, N = 32 1.04x / 1.05x, N = 64 1.04x / 1.03x; one thread 1.00x-1.04x /
// 0.99x-1.03x; d = 1024, r = 64 and d = 768, r = 16 0.94x-1.02x (their [r, d] sums stay in L2
// either way). Under glibc's defaults the page faults of the call's fresh outputs
// (about 240 a call at N = 64, d = 4096, in both) move one-thread times by up to 0.5x between rounds.
bool brgemm_backward_writes_gradients(const Dims& dims, at::ScalarType dtype) {
  const bool split = dtype == at::kHalf && fp16_route(true, dims.n, dims.r) == Fp16Route::bf16x3;
  return dims.n > 0 && dims.n <= brgemm_backward_block_rows(dims) && !split;
}

template <typename T>
void backward_blocks_brgemm(const BackwardOperands& op, BrgemmLayout layout, at::Tensor& dx,
                            at::Tensor& partials, at::Tensor& bias_partials, WeightGradients* gradients) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (fp16_route(true, op.dims.n, op.dims.r) == Fp16Route::bf16x3) {
      return backward_impl<T, c10::BFloat16>(op, layout, dx, partials, bias_partials, gradients);
    }
  }
  backward_impl<T, T>(op, layout, dx, partials, bias_partials, gradients);
}

template void forward_blocks_brgemm<c10::BFloat16>(const ForwardOperands&, BrgemmLayout, at::Tensor&, at::Tensor&);
template void forward_blocks_brgemm<c10::Half>(const ForwardOperands&, BrgemmLayout, at::Tensor&, at::Tensor&);
template void backward_blocks_brgemm<c10::BFloat16>(const BackwardOperands&, BrgemmLayout, at::Tensor&, at::Tensor&,
                                                    at::Tensor&, WeightGradients*);
template void backward_blocks_brgemm<c10::Half>(const BackwardOperands&, BrgemmLayout, at::Tensor&, at::Tensor&,
                                                at::Tensor&, WeightGradients*);
template void forward_blocks_brgemm<float>(const ForwardOperands&, BrgemmLayout, at::Tensor&, at::Tensor&);
template void backward_blocks_brgemm<float>(const BackwardOperands&, BrgemmLayout, at::Tensor&, at::Tensor&,
                                            at::Tensor&, WeightGradients*);

}  // namespace adapterfast::cpu
