#include "cpu/skinny_gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/parallel.h"
#include "dropout_hash.h"

#if PYHAPPY_HAVE_AVX2_KERNELS
#include "cpu/dropout_avx2.h"

namespace pyhappy {
namespace cpu {
namespace skinny {
namespace {

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// dst[0:n] = dropout(src[0:n]) for columns col0.. of row `row` (or a plain copy when inactive).
PYHAPPY_TARGET_AVX2 inline void load_row(const float* src, int64_t n, int64_t row, int64_t col0, const Dropout& d,
                                         float* dst) {
  if (d.active) {
    dropout_row_f32(src, dst, n, dropout_row_key(d.seed, static_cast<uint32_t>(row)), static_cast<uint32_t>(col0),
                    d.threshold, d.scale);
  } else {
    std::copy(src, src + n, dst);
  }
}

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct V {
  using T = __m256;
  static constexpr int W = 8;
  static constexpr int kRows = 6;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float f) { return _mm256_set1_ps(f); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T and_(T a, T b) { return _mm256_and_ps(a, b); }
  static T keep(uint32_t key, uint32_t col, uint32_t threshold) { return dropout_keep8(key, col, threshold); }
};
#define PYHAPPY_SKINNY_INNER inline
#include "cpu/skinny_gemm_kernels.h"
#undef PYHAPPY_SKINNY_INNER
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f")
namespace avx512 {
struct V {
  using T = __m512;
  static constexpr int W = 16;
  static constexpr int kRows = 8;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float f) { return _mm512_set1_ps(f); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T bcast(const float* p) { return _mm512_set1_ps(*p); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T and_(T a, T b) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_castps_si512(b)));
  }
  static T keep(uint32_t key, uint32_t col, uint32_t threshold) {
    const __m256 lo = dropout_keep8(key, col, threshold), hi = dropout_keep8(key, col + 8, threshold);
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
  }
};
#define PYHAPPY_SKINNY_INNER __attribute__((noinline))
#include "cpu/skinny_gemm_kernels.h"
#undef PYHAPPY_SKINNY_INNER
}  // namespace avx512
#pragma GCC pop_options

// The kernel rows (or columns) per register block of the width in use.
int64_t rows_per_block() { return use_avx512() ? avx512::kRows : avx2::kRows; }
}  // namespace

void x_pt(const float* X, int64_t ldx, int64_t M, int64_t D, const float* P, int64_t sp0, int64_t sp1, int64_t r,
          float alpha, const Dropout& drop, float* out, const int64_t* rows) {
  if (M == 0) return;
  const int64_t RP = round_up(r, 16);
  std::vector<float> Pt(static_cast<size_t>(D * RP), 0.0f);  // Pᵀ packed [D, RP], zero-padded columns
  for (int64_t j = 0; j < r; ++j)
    for (int64_t k = 0; k < D; ++k) Pt[k * RP + j] = P[j * sp0 + k * sp1];
  const int64_t R = rows_per_block();
  cpu::parallel_for(0, (M + R - 1) / R, 1, [&](int64_t g0, int64_t g1) {
    if (use_avx512()) return avx512::x_pt_groups(X, ldx, rows, M, D, Pt.data(), RP, r, alpha, drop, out, g0, g1);
    avx2::x_pt_groups(X, ldx, rows, M, D, Pt.data(), RP, r, alpha, drop, out, g0, g1);
  });
}

void gt_x(const float* G, int64_t ldg, int64_t r, const float* X, int64_t ldx, int64_t M, int64_t D, float alpha,
          const Dropout& drop, float* out, int64_t ldo, const int64_t* rows) {
  const int64_t RP = round_up(r, 16);
  std::vector<float> Gp(static_cast<size_t>(M * RP), 0.0f);  // G packed [M, RP], zero-padded
  for (int64_t m = 0; m < M; ++m) std::copy(G + m * ldg, G + m * ldg + r, Gp.data() + m * RP);
  static_assert(avx2::kPanel == avx512::kPanel, "one panel width for both");
  cpu::parallel_for(0, (D + avx2::kPanel - 1) / avx2::kPanel, 1, [&](int64_t b0, int64_t b1) {
    if (use_avx512())
      return avx512::gt_x_panels(Gp.data(), RP, r, X, ldx, rows, M, D, alpha, drop, out, ldo, b0, b1);
    avx2::gt_x_panels(Gp.data(), RP, r, X, ldx, rows, M, D, alpha, drop, out, ldo, b0, b1);
  });
}

void g_p(const float* G, int64_t ldg, int64_t M, int64_t r, const float* P, int64_t ldp, int64_t D,
         const float* bias, float alpha, const Dropout& drop, bool accumulate, float* out, int64_t ldo,
         int64_t col0) {
  const int64_t R = rows_per_block();
  cpu::parallel_for(0, (M + R - 1) / R, 1, [&](int64_t g0, int64_t g1) {
    if (use_avx512())
      return avx512::g_p_groups(G, ldg, M, r, P, ldp, D, bias, alpha, drop, accumulate, out, ldo, col0, g0, g1);
    avx2::g_p_groups(G, ldg, M, r, P, ldp, D, bias, alpha, drop, accumulate, out, ldo, col0, g0, g1);
  });
}

}  // namespace skinny
}  // namespace cpu
}  // namespace pyhappy

#else  // no AVX2 kernels on this architecture: callers check cpu::use_avx2() first

namespace pyhappy {
namespace cpu {
namespace skinny {
void x_pt(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, float, const Dropout&,
          float*, const int64_t*) {
  TORCH_CHECK(false, "skinny::x_pt: built without AVX2 kernels");
}
void gt_x(const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, float, const Dropout&, float*,
          int64_t, const int64_t*) {
  TORCH_CHECK(false, "skinny::gt_x: built without AVX2 kernels");
}
void g_p(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, float,
         const Dropout&, bool, float*, int64_t, int64_t) {
  TORCH_CHECK(false, "skinny::g_p: built without AVX2 kernels");
}
}  // namespace skinny
}  // namespace cpu
}  // namespace pyhappy

#endif
