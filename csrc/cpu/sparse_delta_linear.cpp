// C++ CPU backend of pyhappy::sparse_delta_linear.
//
//   y = x · (W + s·ΔW)ᵀ + bias,   ΔW = values on a fixed pattern of nnz flat indices (row·K + col)
//
// Where the time goes: the base GEMM (BLAS, untouched) is M·N·K; the delta is M·nnz, 1% of it at
// 1% density, but irregular. Never forming the dense ΔW (or the dense dW in the backward) is the
// point: the three delta products are sparse kernels over a CSR/CSC layout built once per pattern.
//
// Panels: the dense operand (x in the forward, dy in the backward) is re-laid as fp32 panels of 16
// rows, P[mc][c][j] = in[16·mc + j, c], so that one nonzero touches 16 contiguous floats (two AVX2
// vectors, one cache line) and a panel (16·C floats, 256 KiB at C = 4096) stays in L2 while a thread
// walks it. A bf16 operand of more than 32 rows is re-laid for the spmm as bf16 panels of 32 rows
// (panel32): the same line per nonzero then carries 32 rows, widened to fp32 exactly in registers.
//   spmm:   out[m, c] += s · Σ_{i ∈ ptr[c]..ptr[c+1]} v_i · in[m, idx_i]        (forward: CSR by
//           output row n over x's columns; dx: CSC by k over dy's columns)
//   sddmm:  dv_i = s · Σ_m dy[m, n_i] · x[m, k_i]                               (fp32 accumulation)
// The spmm accumulates eight output columns × 16 rows in registers and transposes them 8×8 into
// the row-major output; the sddmm reduces eight nonzeros' dot products at once (hadd tree).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/gemm.h"
#include "cpu/parallel.h"
#include "cpu/simd_load.h"

#if PYHAPPY_HAVE_AVX2_KERNELS
#include <immintrin.h>
#endif

namespace pyhappy {
namespace cpu {
namespace {

constexpr int64_t kPanel = 16;  // rows of the dense operand per panel
constexpr int64_t kPanel32 = 32;  // rows per bf16 panel (panel32: one 64-byte line a column, as kPanel's fp32)
constexpr int64_t kGroup = 8;   // output columns (spmm) / nonzeros (sddmm) handled together

// ---- layout -------------------------------------------------------------------------------------
// One int32 tensor per pattern (built by pyhappy.ops.sparse_delta_linear.sparse_layout):
//   [ row_ptr (N+1) | cols (nnz) | t_ptr (K+1) | t_rows (nnz) | t_perm (nnz) ]
// row_ptr/cols: CSR by output row n (the sorted flat indices' order); t_ptr/t_rows: CSC by column
// k; t_perm[j]: position in values of the j-th nonzero in CSC order.
struct Layout {
  int64_t N, K, nnz;
  const int32_t* row_ptr;
  const int32_t* cols;
  const int32_t* t_ptr;
  const int32_t* t_rows;
  const int32_t* t_perm;
};

// Checks everything a kernel relies on for memory safety (pointers monotone within bounds, every
// column/row/position in range), so a hand-made bad layout is an error rather than a wild read.
Layout make_layout(const char* op, const at::Tensor& layout, int64_t nnz, int64_t N, int64_t K) {
  TORCH_CHECK(layout.scalar_type() == at::kInt && layout.dim() == 1 && layout.is_contiguous(), op,
              ": layout must be a contiguous int32 1-D tensor (pyhappy.ops.sparse_layout)");
  TORCH_CHECK(layout.numel() == N + K + 2 + 3 * nnz, op, ": layout has ", layout.numel(),
              " entries but N + K + 2 + 3·nnz = ", N + K + 2 + 3 * nnz, " (built for another pattern or shape?)");
  const int32_t* p = layout.const_data_ptr<int32_t>();
  Layout L{N, K, nnz, p, p + N + 1, p + N + 1 + nnz, p + N + K + 2 + nnz, p + N + K + 2 + 2 * nnz};
  auto check_ptr = [&](const int32_t* ptr, int64_t n, const char* what) {
    TORCH_CHECK(ptr[0] == 0 && ptr[n] == nnz, op, ": layout ", what, " must run from 0 to nnz = ", nnz);
    for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ptr[i] <= ptr[i + 1], op, ": layout ", what, " is not monotone");
  };
  check_ptr(L.row_ptr, N, "row_ptr");
  check_ptr(L.t_ptr, K, "t_ptr");
  bool ok = true;
  for (int64_t i = 0; i < nnz; ++i) {
    ok &= static_cast<uint32_t>(L.cols[i]) < static_cast<uint32_t>(K);
    ok &= static_cast<uint32_t>(L.t_rows[i]) < static_cast<uint32_t>(N);
    ok &= static_cast<uint32_t>(L.t_perm[i]) < static_cast<uint32_t>(nnz);
  }
  TORCH_CHECK(ok, op, ": layout holds a column, row or position out of range (rebuild it with sparse_layout)");
  return L;
}

// ---- panels -------------------------------------------------------------------------------------

// One panel: dst[c·16 + j] = in[m0 + j, c] as fp32 (rows past M zero). Panels live in 64-byte
// aligned buffers (ATen's CPU allocator), so each 16-float panel row is exactly one cache line (a
// buffer aligned to only 16 bytes splits most rows over two lines, which makes the products
// markedly slower; see benchmarks/README.md, "Design measurements", "Sparse-delta panels").
// Memory: a thread holds one panel per operand (16·C floats, 256 KiB at C = 4096), never the whole
// re-laid operand: the op's extra memory is O(nnz + threads·(K + N)).
template <typename T>
void build_panel_portable(const T* in, int64_t M, int64_t C, int64_t m0, float* dst) {
  const int64_t rows = std::min(kPanel, M - m0);
  if (rows < kPanel) std::fill(dst, dst + C * kPanel, 0.0f);
  for (int64_t c0 = 0; c0 < C; c0 += 64) {  // 64-column strips: reads stay sequential per row
    const int64_t c1 = std::min(C, c0 + 64);
    for (int64_t j = 0; j < rows; ++j) {
      const T* src = in + (m0 + j) * C;
      for (int64_t c = c0; c < c1; ++c) dst[c * kPanel + j] = static_cast<float>(src[c]);
    }
  }
}

at::Tensor panel_buffer(int64_t C) {
  at::Tensor t = at::empty({C * kPanel}, at::TensorOptions().dtype(at::kFloat));
  TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(t.const_data_ptr<float>()) % 64 == 0);
  return t;
}

// ---- spmm: out[m, c] += s · Σ v_i · in[m, idx_i] -------------------------------------------------

// Adds acc[r][j] (column c0 + r, row m0 + j) · s into out for r < ncols, j < nrows.
template <typename T>
inline void add_block(const float acc[kGroup][kPanel], T* out, int64_t ldo, int64_t m0, int64_t nrows, int64_t c0,
                      int64_t ncols, float s) {
  for (int64_t j = 0; j < nrows; ++j) {
    T* o = out + (m0 + j) * ldo + c0;
    for (int64_t r = 0; r < ncols; ++r) o[r] = static_cast<T>(static_cast<float>(o[r]) + s * acc[r][j]);
  }
}

template <typename T>
void spmm_group_portable(const float* panel, const int32_t* ptr, const int32_t* idx, const float* vals, int64_t c0,
                         int64_t ncols, T* out, int64_t ldo, int64_t m0, int64_t nrows, float s) {
  float acc[kGroup][kPanel] = {};
  for (int64_t r = 0; r < ncols; ++r) {
    for (int32_t i = ptr[c0 + r]; i < ptr[c0 + r + 1]; ++i) {
      const float v = vals[i];
      const float* p = panel + static_cast<int64_t>(idx[i]) * kPanel;
      for (int64_t j = 0; j < kPanel; ++j) acc[r][j] += v * p[j];
    }
  }
  add_block(acc, out, ldo, m0, nrows, c0, ncols, s);
}

#if PYHAPPY_HAVE_AVX2_KERNELS
// 8x8 transpose: rows r[0..8) -> columns.
PYHAPPY_TARGET_AVX2 inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// build_panel for a full panel (16 rows) and C % 8 == 0: 8x8 blocks transposed in registers (the
// scalar loop's strided stores made panel building ~1/3 of the sparse products' time at M=512).
template <typename T>
PYHAPPY_TARGET_AVX2 void build_panel_avx2(const T* in, int64_t C, int64_t m0, float* dst) {
  for (int64_t c = 0; c < C; c += 8) {
    for (int64_t h = 0; h < kPanel; h += 8) {
      __m256 r[8];
      for (int j = 0; j < 8; ++j) r[j] = load8_as_float(in + (m0 + h + j) * C + c);
      transpose8(r);  // r[i] = column c + i, rows m0 + h .. m0 + h + 8
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (c + i) * kPanel + h, r[i]);
    }
  }
}
#endif

template <typename T>
void build_panel(const T* in, int64_t M, int64_t C, int64_t m0, float* dst) {
#if PYHAPPY_HAVE_AVX2_KERNELS
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>) {
    if (M - m0 >= kPanel && C % 8 == 0 && use_avx2()) return build_panel_avx2(in, C, m0, dst);
  }
#endif
  build_panel_portable(in, M, C, m0, dst);
}

#if PYHAPPY_HAVE_AVX2_KERNELS
// out[m0 + j, c0 + r] += s · acc, for acc column r's rows j < 8 in lo[r] and 8 <= j < 16 in hi[r]
// (rows j < nrows, columns r < ncols); lo and hi are transposed in place.
template <typename T>
PYHAPPY_TARGET_AVX2 inline void add_group_avx2(__m256 lo[kGroup], __m256 hi[kGroup], T* out, int64_t ldo,
                                               int64_t m0, int64_t nrows, int64_t c0, int64_t ncols, float s) {
  transpose8(lo);  // lo[j] = rows m0 + j, columns c0..c0+8
  transpose8(hi);  // hi[j] = rows m0 + 8 + j
  const __m256 sv = _mm256_set1_ps(s);
  for (int64_t j = 0; j < nrows; ++j) {
    const __m256 v = j < 8 ? lo[j] : hi[j - 8];
    T* o = out + (m0 + j) * ldo + c0;
    if constexpr (std::is_same_v<T, float>) {
      if (ncols == kGroup) {
        _mm256_storeu_ps(o, _mm256_fmadd_ps(sv, v, _mm256_loadu_ps(o)));
        continue;
      }
    }
    alignas(32) float tmp[kGroup];
    _mm256_store_ps(tmp, v);
    for (int64_t r = 0; r < ncols; ++r) o[r] = static_cast<T>(static_cast<float>(o[r]) + s * tmp[r]);
  }
}

template <typename T>
PYHAPPY_TARGET_AVX2 void spmm_group_avx2(const float* panel, const int32_t* ptr, const int32_t* idx,
                                         const float* vals, int64_t c0, int64_t ncols, T* out, int64_t ldo,
                                         int64_t m0, int64_t nrows, float s) {
  __m256 lo[kGroup], hi[kGroup];
  for (int r = 0; r < kGroup; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t r = 0; r < ncols; ++r) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
    int32_t i = ptr[c0 + r];
    const int32_t e = ptr[c0 + r + 1];
    for (; i + 1 < e; i += 2) {  // two independent chains per half: FMA latency hidden
      const float* p = panel + static_cast<int64_t>(idx[i]) * kPanel;
      const float* q = panel + static_cast<int64_t>(idx[i + 1]) * kPanel;
      const __m256 v = _mm256_broadcast_ss(vals + i), w = _mm256_broadcast_ss(vals + i + 1);
      a0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(p), a0);
      a1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(p + 8), a1);
      b0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(q), b0);
      b1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(q + 8), b1);
    }
    if (i < e) {
      const float* p = panel + static_cast<int64_t>(idx[i]) * kPanel;
      const __m256 v = _mm256_broadcast_ss(vals + i);
      a0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(p), a0);
      a1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(p + 8), a1);
    }
    lo[r] = _mm256_add_ps(a0, b0);
    hi[r] = _mm256_add_ps(a1, b1);
  }
  add_group_avx2<T>(lo, hi, out, ldo, m0, nrows, c0, ncols, s);
}

// One panel32 column's 32 values as fp32, rows 0-7, 8-15, 16-23, 24-31 (exact: bf16 is the high
// half of a float32).
PYHAPPY_TARGET_AVX2 inline void widen32(const uint16_t* p, __m256 f[4]) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m256i v0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i v1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 16));
  f[0] = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
  f[1] = _mm256_castsi256_ps(_mm256_and_si256(v0, high));
  f[2] = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
  f[3] = _mm256_castsi256_ps(_mm256_and_si256(v1, high));
}

// The same products on a bf16 panel of 32 rows (panel32, below): each nonzero reads one 64-byte line
// for 32 rows, where the fp32 panel's line holds 16. The values widen to fp32 exactly and every row
// sums the same products in the same order (two chains, even and odd nonzeros) as spmm_group_avx2,
// so the results are bit-identical to the fp32 panel's.
PYHAPPY_TARGET_AVX2 void spmm_group_bf16_avx2(const uint16_t* panel, const int32_t* ptr, const int32_t* idx,
                                              const float* vals, int64_t c0, int64_t ncols, at::BFloat16* out,
                                              int64_t ldo, int64_t m0, int64_t nrows, float s) {
  __m256 acc[4][kGroup];  // rows 0-7, 8-15, 16-23, 24-31 of each column
  for (int q = 0; q < 4; ++q)
    for (int r = 0; r < kGroup; ++r) acc[q][r] = _mm256_setzero_ps();
  for (int64_t r = 0; r < ncols; ++r) {
    __m256 a[4], b[4], f[4], g[4];
    for (int q = 0; q < 4; ++q) a[q] = b[q] = _mm256_setzero_ps();
    int32_t i = ptr[c0 + r];
    const int32_t e = ptr[c0 + r + 1];
    for (; i + 1 < e; i += 2) {
      widen32(panel + static_cast<int64_t>(idx[i]) * kPanel32, f);
      widen32(panel + static_cast<int64_t>(idx[i + 1]) * kPanel32, g);
      const __m256 v = _mm256_broadcast_ss(vals + i), w = _mm256_broadcast_ss(vals + i + 1);
      for (int q = 0; q < 4; ++q) {
        a[q] = _mm256_fmadd_ps(v, f[q], a[q]);
        b[q] = _mm256_fmadd_ps(w, g[q], b[q]);
      }
    }
    if (i < e) {
      widen32(panel + static_cast<int64_t>(idx[i]) * kPanel32, f);
      const __m256 v = _mm256_broadcast_ss(vals + i);
      for (int q = 0; q < 4; ++q) a[q] = _mm256_fmadd_ps(v, f[q], a[q]);
    }
    for (int q = 0; q < 4; ++q) acc[q][r] = _mm256_add_ps(a[q], b[q]);
  }
  add_group_avx2<at::BFloat16>(acc[0], acc[1], out, ldo, m0, std::min<int64_t>(nrows, kPanel), c0, ncols, s);
  if (nrows > kPanel) add_group_avx2<at::BFloat16>(acc[2], acc[3], out, ldo, m0 + kPanel, nrows - kPanel, c0, ncols, s);
}

// The same on AVX-512F: one zmm load a nonzero, its shift / mask giving rows 0-7 and 16-23 (lo) and
// 8-15 and 24-31 (hi); the per-row sums are the AVX2 kernel's, so the results are bit-identical. Four
// nonzeros in flight (two each for the even and odd chains, taken in order), which the 32 zmm
// registers hold without spilling.
__attribute__((target("avx2,fma,avx512f"))) void spmm_group_bf16_avx512(
    const uint16_t* panel, const int32_t* ptr, const int32_t* idx, const float* vals, int64_t c0, int64_t ncols,
    at::BFloat16* out, int64_t ldo, int64_t m0, int64_t nrows, float s) {
  __m256 acc[4][kGroup];
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __mmask16 kAll = 0xFFFF;  // (masked forms: GCC 12 warns on the unmasked ones' undefined source)
  for (int64_t r = 0; r < kGroup; ++r) {
    if (r >= ncols) {
      for (int q = 0; q < 4; ++q) acc[q][r] = _mm256_setzero_ps();
      continue;
    }
    __m512 alo = _mm512_setzero_ps(), ahi = _mm512_setzero_ps(), blo = _mm512_setzero_ps(), bhi = _mm512_setzero_ps();
    int32_t i = ptr[c0 + r];
    const int32_t e = ptr[c0 + r + 1];
    for (; i + 3 < e; i += 4) {
      const __m512i p0 = _mm512_load_si512(panel + static_cast<int64_t>(idx[i]) * kPanel32);
      const __m512i p1 = _mm512_load_si512(panel + static_cast<int64_t>(idx[i + 1]) * kPanel32);
      const __m512i p2 = _mm512_load_si512(panel + static_cast<int64_t>(idx[i + 2]) * kPanel32);
      const __m512i p3 = _mm512_load_si512(panel + static_cast<int64_t>(idx[i + 3]) * kPanel32);
      const __m512 v0 = _mm512_set1_ps(vals[i]), v1 = _mm512_set1_ps(vals[i + 1]);
      const __m512 v2 = _mm512_set1_ps(vals[i + 2]), v3 = _mm512_set1_ps(vals[i + 3]);
      alo = _mm512_fmadd_ps(v0, _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, p0, 16)), alo);
      ahi = _mm512_fmadd_ps(v0, _mm512_castsi512_ps(_mm512_and_si512(p0, high)), ahi);
      blo = _mm512_fmadd_ps(v1, _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, p1, 16)), blo);
      bhi = _mm512_fmadd_ps(v1, _mm512_castsi512_ps(_mm512_and_si512(p1, high)), bhi);
      alo = _mm512_fmadd_ps(v2, _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, p2, 16)), alo);
      ahi = _mm512_fmadd_ps(v2, _mm512_castsi512_ps(_mm512_and_si512(p2, high)), ahi);
      blo = _mm512_fmadd_ps(v3, _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, p3, 16)), blo);
      bhi = _mm512_fmadd_ps(v3, _mm512_castsi512_ps(_mm512_and_si512(p3, high)), bhi);
    }
    for (; i < e; ++i) {  // the rest in order: even positions (from the column's start) to a, odd to b
      const __m512i p0 = _mm512_load_si512(panel + static_cast<int64_t>(idx[i]) * kPanel32);
      const __m512 v0 = _mm512_set1_ps(vals[i]);
      const __m512 lo = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, p0, 16));
      const __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(p0, high));
      if (((i - ptr[c0 + r]) & 1) == 0) {
        alo = _mm512_fmadd_ps(v0, lo, alo);
        ahi = _mm512_fmadd_ps(v0, hi, ahi);
      } else {
        blo = _mm512_fmadd_ps(v0, lo, blo);
        bhi = _mm512_fmadd_ps(v0, hi, bhi);
      }
    }
    const __m512 lo = _mm512_add_ps(alo, blo), hi = _mm512_add_ps(ahi, bhi);
    acc[0][r] = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, _mm512_castps_pd(lo), 0));
    acc[1][r] = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, _mm512_castps_pd(hi), 0));
    acc[2][r] = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, _mm512_castps_pd(lo), 1));
    acc[3][r] = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, _mm512_castps_pd(hi), 1));
  }
  add_group_avx2<at::BFloat16>(acc[0], acc[1], out, ldo, m0, std::min<int64_t>(nrows, kPanel), c0, ncols, s);
  if (nrows > kPanel) add_group_avx2<at::BFloat16>(acc[2], acc[3], out, ldo, m0 + kPanel, nrows - kPanel, c0, ncols, s);
}
#endif

// ---- bf16 panels ---------------------------------------------------------------------------------
// For bf16 operands of more than one panel of rows, the spmm reads panels of the bf16 bits of 32 rows
// a column (panel32): the same 64-byte line per nonzero carries twice the rows of an fp32 panel, and
// the products are bound by those lines (~4 cycles a line from L2 on the CPUs measured; see
// benchmarks/README.md, "Design measurements", "Sparse-delta panels"). Rows are arranged so that an
// AVX2 load of 16 values and a shift / mask of its 32-bit lanes give rows in order, no shuffle: lane l
// of a column's first 16 values holds rows l (low half) and l + 8 (high half), of its second 16 rows
// 16 + l and 24 + l. dst[c·32 + pos32(j)] = bits of in[m0 + j, c]; rows past M zero.
inline int64_t pos32(int64_t j) {
  const int64_t jj = j % kPanel;
  return (j / kPanel) * kPanel + (jj % 8) * 2 + jj / 8;
}

void build_panel32_portable(const at::BFloat16* in, int64_t M, int64_t C, int64_t m0, uint16_t* dst) {
  const int64_t rows = std::min(kPanel32, M - m0);
  if (rows < kPanel32) std::fill(dst, dst + C * kPanel32, uint16_t{0});
  for (int64_t c0 = 0; c0 < C; c0 += 64) {  // 64-column strips: reads stay sequential per row
    const int64_t c1 = std::min(C, c0 + 64);
    for (int64_t j = 0; j < rows; ++j) {
      const uint16_t* src = reinterpret_cast<const uint16_t*>(in + (m0 + j) * C);
      const int64_t p = pos32(j);
      for (int64_t c = c0; c < c1; ++c) dst[c * kPanel32 + p] = src[c];
    }
  }
}

at::Tensor panel32_buffer(int64_t C) {
  at::Tensor t = at::empty({C * kPanel32}, at::TensorOptions().dtype(at::kBFloat16));
  TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(t.const_data_ptr<at::BFloat16>()) % 64 == 0);
  return t;
}

#if PYHAPPY_HAVE_AVX2_KERNELS
// A full panel32 (32 rows) for C % 16 == 0, 16 columns at a time: rows h + j and h + j + 8
// interleaved into 32-bit pairs (unpack), then an 8x8 transpose of the pairs gives each column's
// eight lanes.
PYHAPPY_TARGET_AVX2 void build_panel32_avx2(const at::BFloat16* in, int64_t C, int64_t m0, uint16_t* dst) {
  static constexpr int64_t kCol[8] = {0, 1, 2, 3, 8, 9, 10, 11};  // columns of unpacklo's lanes
  for (int64_t c = 0; c < C; c += 16) {
    for (int64_t h = 0; h < kPanel32; h += kPanel) {
      __m256 lo[8], hi[8];
      for (int j = 0; j < 8; ++j) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + (m0 + h + j) * C + c));
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + (m0 + h + j + 8) * C + c));
        lo[j] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(a, b));  // columns c + {0..3, 8..11}
        hi[j] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(a, b));  // columns c + {4..7, 12..15}
      }
      transpose8(lo);  // lo[i]: the eight row pairs of column c + kCol[i]
      transpose8(hi);  // hi[i]: those of column c + kCol[i] + 4
      for (int i = 0; i < 8; ++i) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(dst + (c + kCol[i]) * kPanel32 + h), _mm256_castps_si256(lo[i]));
        _mm256_store_si256(reinterpret_cast<__m256i*>(dst + (c + kCol[i] + 4) * kPanel32 + h),
                           _mm256_castps_si256(hi[i]));
      }
    }
  }
}

void build_panel32(const at::BFloat16* in, int64_t M, int64_t C, int64_t m0, uint16_t* dst) {
  if (M - m0 >= kPanel32 && C % 16 == 0) return build_panel32_avx2(in, C, m0, dst);
  build_panel32_portable(in, M, C, m0, dst);
}

// spmm_add for a bf16 operand of at least two panel32s of rows, on AVX2: threads split the panels.
void spmm_add_panel32(const at::BFloat16* in, int64_t M, int64_t Kin, const int32_t* ptr, const int32_t* idx,
                      const float* vals, int64_t C, at::BFloat16* out, float s) {
  const int64_t Mc = (M + kPanel32 - 1) / kPanel32;
  cpu::parallel_for(0, Mc, 1, [&](int64_t a, int64_t b) {
    at::Tensor buf = panel32_buffer(Kin);
    uint16_t* panel = reinterpret_cast<uint16_t*>(buf.data_ptr<at::BFloat16>());
    const bool zmm = use_avx512();
    for (int64_t mc = a; mc < b; ++mc) {
      const int64_t m0 = mc * kPanel32, nrows = std::min(kPanel32, M - m0);
      build_panel32(in, M, Kin, m0, panel);
      for (int64_t c = 0; c < C; c += kGroup) {
        const int64_t ncols = std::min(kGroup, C - c);
        if (zmm) {
          spmm_group_bf16_avx512(panel, ptr, idx, vals, c, ncols, out, C, m0, nrows, s);
        } else {
          spmm_group_bf16_avx2(panel, ptr, idx, vals, c, ncols, out, C, m0, nrows, s);
        }
      }
    }
  });
}
#endif

// Columns [c0, c1) of out, rows of one panel.
template <typename T>
void spmm_columns(const float* panel, const int32_t* ptr, const int32_t* idx, const float* vals, int64_t c0,
                  int64_t c1, T* out, int64_t ldo, int64_t m0, int64_t nrows, float s, bool simd) {
  for (int64_t c = c0; c < c1; c += kGroup) {
    const int64_t ncols = std::min(kGroup, c1 - c);
#if PYHAPPY_HAVE_AVX2_KERNELS
    if (simd) {
      spmm_group_avx2<T>(panel, ptr, idx, vals, c, ncols, out, ldo, m0, nrows, s);
      continue;
    }
#endif
    spmm_group_portable<T>(panel, ptr, idx, vals, c, ncols, out, ldo, m0, nrows, s);
  }
}

// out [M, C] (row-major, ld = C) += s · in · Sᵀ for in [M, Kin] and S [C, Kin] the CSR (ptr, idx, vals).
// One panel (M <= 16, decode): built once, threads split the columns. Otherwise threads split the
// panels, each building its own and walking every column with it (the panel stays in L2).
template <typename T>
void spmm_add(const T* in, int64_t M, int64_t Kin, const int32_t* ptr, const int32_t* idx, const float* vals,
              int64_t C, T* out, float s) {
  if (M == 0 || C == 0) return;
  const int64_t Mc = (M + kPanel - 1) / kPanel;
  const bool simd = use_avx2();
#if PYHAPPY_HAVE_AVX2_KERNELS
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (simd && M > kPanel32) return spmm_add_panel32(in, M, Kin, ptr, idx, vals, C, out, s);
  }
#endif
  if (Mc == 1) {
    at::Tensor buf = panel_buffer(Kin);
    build_panel(in, M, Kin, 0, buf.data_ptr<float>());
    const float* panel = buf.const_data_ptr<float>();
    cpu::parallel_for(0, (C + kGroup - 1) / kGroup, 16, [&](int64_t g0, int64_t g1) {
      spmm_columns<T>(panel, ptr, idx, vals, g0 * kGroup, std::min(C, g1 * kGroup), out, C, 0, M, s, simd);
    });
    return;
  }
  cpu::parallel_for(0, Mc, 1, [&](int64_t a, int64_t b) {
    at::Tensor buf = panel_buffer(Kin);
    float* panel = buf.data_ptr<float>();
    for (int64_t mc = a; mc < b; ++mc) {
      const int64_t m0 = mc * kPanel;
      build_panel(in, M, Kin, m0, panel);
      spmm_columns<T>(panel, ptr, idx, vals, 0, C, out, C, m0, std::min(kPanel, M - m0), s, simd);
    }
  });
}

// ---- sddmm: dv_i = s · Σ_m dy[m, row_i] · x[m, col_i] ---------------------------------------------

// dv[i] += Σ_{j<16} dpan[n_i, j] · xpan[k_i, j] for the nonzeros of rows [n0, n1) (one panel pair).
void sddmm_rows_portable(const float* dpan, const float* xpan, const Layout& L, int64_t n0, int64_t n1, float* dv) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* d = dpan + n * kPanel;
    for (int32_t i = L.row_ptr[n]; i < L.row_ptr[n + 1]; ++i) {
      const float* xr = xpan + static_cast<int64_t>(L.cols[i]) * kPanel;
      float acc = 0.0f;
      for (int64_t j = 0; j < kPanel; ++j) acc += d[j] * xr[j];
      dv[i] += acc;
    }
  }
}

#if PYHAPPY_HAVE_AVX2_KERNELS
PYHAPPY_TARGET_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x1));
  return _mm_cvtss_f32(s);
}

PYHAPPY_TARGET_AVX2 void sddmm_rows_avx2(const float* dpan, const float* xpan, const Layout& L, int64_t n0,
                                         int64_t n1, float* dv) {
  for (int64_t n = n0; n < n1; ++n) {
    const __m256 d0 = _mm256_loadu_ps(dpan + n * kPanel), d1 = _mm256_loadu_ps(dpan + n * kPanel + 8);
    int32_t i = L.row_ptr[n];
    const int32_t e = L.row_ptr[n + 1];
    for (; i + kGroup <= e; i += kGroup) {
      __m256 a[kGroup];
      for (int g = 0; g < kGroup; ++g) {
        const float* xr = xpan + static_cast<int64_t>(L.cols[i + g]) * kPanel;
        a[g] = _mm256_fmadd_ps(d1, _mm256_loadu_ps(xr + 8), _mm256_mul_ps(d0, _mm256_loadu_ps(xr)));
      }
      // hadd tree: eight dot products -> one vector [dot_0 .. dot_7]
      const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
      const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
      const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
      const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
      _mm256_storeu_ps(dv + i, _mm256_add_ps(_mm256_loadu_ps(dv + i), sum));
    }
    for (; i < e; ++i) {
      const float* xr = xpan + static_cast<int64_t>(L.cols[i]) * kPanel;
      dv[i] += hsum8(_mm256_fmadd_ps(d1, _mm256_loadu_ps(xr + 8), _mm256_mul_ps(d0, _mm256_loadu_ps(xr))));
    }
  }
}
#endif

void sddmm_rows(const float* dpan, const float* xpan, const Layout& L, int64_t n0, int64_t n1, float* dv, bool simd) {
#if PYHAPPY_HAVE_AVX2_KERNELS
  if (simd) {
    sddmm_rows_avx2(dpan, xpan, L, n0, n1, dv);
    return;
  }
#endif
  sddmm_rows_portable(dpan, xpan, L, n0, n1, dv);
}

// dv [nnz] fp32 (unscaled) = Σ_m dy[m, n_i] · x[m, k_i]. One panel pair (M <= 16): threads split
// the rows n. Otherwise threads split the panels, each summing into its own fp32 [nnz] partial
// (reduced at the end; O(threads·nnz) memory), so no two threads write one dv entry.
template <typename T>
at::Tensor sddmm(const T* dy, const T* x, int64_t M, const Layout& L) {
  at::Tensor dv = at::zeros({L.nnz}, at::TensorOptions().dtype(at::kFloat));
  if (M == 0 || L.nnz == 0) return dv;
  const int64_t Mc = (M + kPanel - 1) / kPanel;
  const bool simd = use_avx2();
  if (Mc == 1) {
    at::Tensor db = panel_buffer(L.N), xb = panel_buffer(L.K);
    build_panel(dy, M, L.N, 0, db.data_ptr<float>());
    build_panel(x, M, L.K, 0, xb.data_ptr<float>());
    float* d = dv.data_ptr<float>();
    cpu::parallel_for(0, L.N, 64, [&](int64_t n0, int64_t n1) {
      sddmm_rows(db.const_data_ptr<float>(), xb.const_data_ptr<float>(), L, n0, n1, d, simd);
    });
    return dv;
  }
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), Mc);
  at::Tensor partial = at::zeros({nt, L.nnz}, at::TensorOptions().dtype(at::kFloat));
  cpu::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor db = panel_buffer(L.N), xb = panel_buffer(L.K);
    for (int64_t t = t0; t < t1; ++t) {
      float* d = partial.data_ptr<float>() + t * L.nnz;
      for (int64_t mc = t * Mc / nt; mc < (t + 1) * Mc / nt; ++mc) {
        build_panel(dy, M, L.N, mc * kPanel, db.data_ptr<float>());
        build_panel(x, M, L.K, mc * kPanel, xb.data_ptr<float>());
        sddmm_rows(db.const_data_ptr<float>(), xb.const_data_ptr<float>(), L, 0, L.N, d, simd);
      }
    }
  });
  return nt == 1 ? partial[0] : partial.sum(0);
}

// ---- ops ----------------------------------------------------------------------------------------
void check_common(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                  const at::Tensor& values, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), op, ": x must be a 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(values.dim() == 1 && values.scalar_type() == x.scalar_type() && values.device().is_cpu(), op,
              ": values must be a 1-D CPU tensor of x's dtype");
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 2 && weight->size(0) == N && weight->size(1) == x.size(1) &&
                    weight->scalar_type() == x.scalar_type() && weight->device().is_cpu(),
                op, ": weight must be [N, K] = [", N, ", ", x.size(1), "] in x's dtype, got ", weight->sizes());
  }
}

at::Tensor values_f32(const at::Tensor& values) { return values.detach().to(at::kFloat).contiguous(); }

at::Tensor sparse_delta_linear_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& values,
                                   const at::Tensor& layout, int64_t N, double scale) {
  const char* op = "sparse_delta_linear_cpu";
  check_common(op, x_in, weight, values, N);
  const at::Tensor x = x_in.detach().contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  const Layout L = make_layout(op, layout, values.numel(), N, K);
  at::Tensor y;
  if (weight.has_value()) {
    y = bias.has_value() ? gemm::addmm(bias->detach(), x, weight->detach().t()) : gemm::mm(x, weight->detach().t());
  } else {
    y = bias.has_value() ? bias->detach().expand({M, N}).contiguous() : at::zeros({M, N}, x.options());
  }
  const at::Tensor v = values_f32(values);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "pyhappy_sparse_delta_fwd", [&] {
    spmm_add<scalar_t>(x.const_data_ptr<scalar_t>(), M, K, L.row_ptr, L.cols, v.const_data_ptr<float>(), N,
                       y.data_ptr<scalar_t>(), static_cast<float>(scale));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> sparse_delta_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const at::Tensor& values, const at::Tensor& layout, double scale, bool need_grad_x, bool need_grad_values) {
  const char* op = "sparse_delta_linear_backward_cpu";
  const int64_t N = grad_out.dim() == 2 ? grad_out.size(1) : -1;
  check_common(op, x_in, weight, values, N);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == x_in.size(0) && grad_out.scalar_type() == x_in.scalar_type(),
              op, ": grad_out must be [M, N] in x's dtype, got ", grad_out.sizes());
  const at::Tensor x = x_in.detach().contiguous(), dy = grad_out.detach().contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  const Layout L = make_layout(op, layout, values.numel(), N, K);
  at::Tensor gx = at::empty({0}, x.options()), gv = at::empty({0}, values.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "pyhappy_sparse_delta_bwd", [&] {
    if (need_grad_x) {
      gx = weight.has_value() ? gemm::mm(dy, weight->detach()) : at::zeros({M, K}, x.options());
      // CSC values: v_t[j] = v[t_perm[j]]
      const at::Tensor v = values_f32(values);
      std::vector<float> vt(static_cast<size_t>(L.nnz));
      const float* vp = v.const_data_ptr<float>();
      for (int64_t j = 0; j < L.nnz; ++j) vt[j] = vp[L.t_perm[j]];
      spmm_add<scalar_t>(dy.const_data_ptr<scalar_t>(), M, N, L.t_ptr, L.t_rows, vt.data(), K, gx.data_ptr<scalar_t>(),
                         static_cast<float>(scale));
    }
    if (need_grad_values) {
      at::Tensor dv = sddmm(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), M, L);
      if (scale != 1.0) dv.mul_(scale);
      gv = dv.to(values.scalar_type());
    }
  });
  return {gx, gv};
}

}  // namespace
}  // namespace cpu
}  // namespace pyhappy

TORCH_LIBRARY_FRAGMENT(pyhappy, m) {
  m.def(
      "sparse_delta_linear_cpu(Tensor x, Tensor? weight, Tensor? bias, Tensor values, Tensor layout, int N, "
      "float scale) -> Tensor");
  m.def(
      "sparse_delta_linear_backward_cpu(Tensor grad_out, Tensor x, Tensor? weight, Tensor values, Tensor layout, "
      "float scale, bool need_grad_x, bool need_grad_values) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyhappy, CPU, m) {
  m.impl("sparse_delta_linear_cpu", &pyhappy::cpu::sparse_delta_linear_cpu);
  m.impl("sparse_delta_linear_backward_cpu", &pyhappy::cpu::sparse_delta_linear_backward_cpu);
}
