#include "cpu/skinny_gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#include "cpu/cpu_features.h"
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

// acc[i][v] = Σ_k x_i[k] · Pt[k, 8v : 8v+8] for 4 rows and NV*8 packed columns.
// The sums live in a local array with constant indices only, so they stay in registers; they are
// copied to acc (which callers index at run time, forcing it into memory) once at the end.
template <int NV>
PYHAPPY_TARGET_AVX2 inline void rows4_dot(const float* const* xr, int64_t D, const float* Pt, int64_t ldpt,
                                          __m256 (&acc)[4][2]) {
  __m256 a[4][2];
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < 2; ++v) a[i][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < D; ++k) {
    const float* p = Pt + k * ldpt;
    const __m256 p0 = _mm256_loadu_ps(p);
    const __m256 p1 = NV == 2 ? _mm256_loadu_ps(p + 8) : _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      const __m256 xb = _mm256_broadcast_ss(xr[i] + k);
      a[i][0] = _mm256_fmadd_ps(xb, p0, a[i][0]);
      if (NV == 2) a[i][1] = _mm256_fmadd_ps(xb, p1, a[i][1]);
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < 2; ++v) acc[i][v] = a[i][v];
}

// acc[jj][v] = Σ_m g[m, jj] · xb[m, 8v : 8v+8] for 8 rank columns of packed G and a 16-wide panel.
PYHAPPY_TARGET_AVX2 inline void panel_dot(const float* Gp, int64_t RP, const float* xb, int64_t M,
                                          __m256 (&acc)[8][2]) {
  __m256 a[8][2];
  for (int jj = 0; jj < 8; ++jj) a[jj][0] = a[jj][1] = _mm256_setzero_ps();
  for (int64_t m = 0; m < M; ++m) {
    const __m256 x0 = _mm256_loadu_ps(xb + m * 16);
    const __m256 x1 = _mm256_loadu_ps(xb + m * 16 + 8);
    const float* g = Gp + m * RP;
    for (int jj = 0; jj < 8; ++jj) {
      const __m256 gb = _mm256_broadcast_ss(g + jj);
      a[jj][0] = _mm256_fmadd_ps(gb, x0, a[jj][0]);
      a[jj][1] = _mm256_fmadd_ps(gb, x1, a[jj][1]);
    }
  }
  for (int jj = 0; jj < 8; ++jj) {
    acc[jj][0] = a[jj][0];
    acc[jj][1] = a[jj][1];
  }
}

// acc[i][v] = Σ_j g_i[j] · P[j, c + 8v : c + 8v + 8] for 4 rows of G and 16 columns of P.
PYHAPPY_TARGET_AVX2 inline void rows4_p16(const float* const* gr, int64_t r, const float* P, int64_t ldp, int64_t c,
                                          __m256 (&acc)[4][2]) {
  __m256 a[4][2];
  for (int i = 0; i < 4; ++i) a[i][0] = a[i][1] = _mm256_setzero_ps();
  for (int64_t j = 0; j < r; ++j) {
    const __m256 p0 = _mm256_loadu_ps(P + j * ldp + c);
    const __m256 p1 = _mm256_loadu_ps(P + j * ldp + c + 8);
    for (int i = 0; i < 4; ++i) {
      const __m256 gb = _mm256_broadcast_ss(gr[i] + j);
      a[i][0] = _mm256_fmadd_ps(gb, p0, a[i][0]);
      a[i][1] = _mm256_fmadd_ps(gb, p1, a[i][1]);
    }
  }
  for (int i = 0; i < 4; ++i) {
    acc[i][0] = a[i][0];
    acc[i][1] = a[i][1];
  }
}

// Rows [4*g0, 4*g1) of x_pt.
PYHAPPY_TARGET_AVX2 void x_pt_groups(const float* X, int64_t ldx, int64_t M, int64_t D, const float* Pt, int64_t RP,
                                     int64_t r, float alpha, const Dropout& drop, float* out, int64_t g0, int64_t g1) {
  std::vector<float> xbuf(drop.active ? static_cast<size_t>(4 * D) : 0);
  const __m256 va = _mm256_set1_ps(alpha);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t m0 = g * 4, nr = std::min<int64_t>(4, M - m0);
    const float* xr[4];
    for (int i = 0; i < 4; ++i) {
      const int64_t ii = std::min<int64_t>(i, nr - 1);  // short group: repeat the last row, discard it
      if (drop.active) {
        if (i < nr) load_row(X + (m0 + i) * ldx, D, m0 + i, 0, drop, xbuf.data() + i * D);
        xr[i] = xbuf.data() + ii * D;
      } else {
        xr[i] = X + (m0 + ii) * ldx;
      }
    }
    for (int64_t c = 0; c < RP; c += 16) {
      __m256 acc[4][2];
      if (c + 16 <= RP) rows4_dot<2>(xr, D, Pt + c, RP, acc);
      else rows4_dot<1>(xr, D, Pt + c, RP, acc);
      const int64_t n = std::min<int64_t>(16, r - c);
      for (int64_t i = 0; i < nr; ++i) {
        alignas(32) float tmp[16];
        _mm256_store_ps(tmp, _mm256_mul_ps(acc[i][0], va));
        _mm256_store_ps(tmp + 8, _mm256_mul_ps(acc[i][1], va));
        std::copy(tmp, tmp + n, out + (m0 + i) * r + c);
      }
    }
  }
}

// Column panels [16*b0, 16*b1) of gt_x; Gp is G packed [M, RP].
PYHAPPY_TARGET_AVX2 void gt_x_panels(const float* Gp, int64_t RP, int64_t r, const float* X, int64_t ldx, int64_t M,
                                     int64_t D, float alpha, const Dropout& drop, float* out, int64_t ldo, int64_t b0,
                                     int64_t b1) {
  std::vector<float> xb(static_cast<size_t>(std::max<int64_t>(M, 1) * 16), 0.0f);  // [M, 16] column panel
  const __m256 va = _mm256_set1_ps(alpha);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t c0 = b * 16, nc = std::min<int64_t>(16, D - c0);
    for (int64_t m = 0; m < M; ++m) load_row(X + m * ldx + c0, nc, m, c0, drop, xb.data() + m * 16);
    for (int64_t j0 = 0; j0 < r; j0 += 8) {
      __m256 acc[8][2];
      panel_dot(Gp + j0, RP, xb.data(), M, acc);
      for (int jj = 0; jj < 8 && j0 + jj < r; ++jj) {
        alignas(32) float tmp[16];
        _mm256_store_ps(tmp, _mm256_mul_ps(acc[jj][0], va));
        _mm256_store_ps(tmp + 8, _mm256_mul_ps(acc[jj][1], va));
        std::copy(tmp, tmp + nc, out + (j0 + jj) * ldo + c0);
      }
    }
  }
}

// Rows [4*g0, 4*g1) of g_p.
PYHAPPY_TARGET_AVX2 void g_p_groups(const float* G, int64_t ldg, int64_t M, int64_t r, const float* P, int64_t ldp,
                                    int64_t D, const float* bias, float alpha, const Dropout& drop, bool accumulate,
                                    float* out, int64_t ldo, int64_t g0, int64_t g1) {
  const int64_t D16 = D / 16 * 16;
  const __m256 va = _mm256_set1_ps(alpha);
  const __m256 vs = _mm256_set1_ps(drop.scale);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t m0 = g * 4, nr = std::min<int64_t>(4, M - m0);
    const float* gr[4];
    uint32_t keys[4];
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m0 + std::min<int64_t>(i, nr - 1);
      gr[i] = G + m * ldg;
      keys[i] = dropout_row_key(drop.seed, static_cast<uint32_t>(m));
    }
    for (int64_t c = 0; c < D16; c += 16) {
      __m256 acc[4][2];
      rows4_p16(gr, r, P, ldp, c, acc);
      for (int64_t i = 0; i < nr; ++i) {
        for (int v = 0; v < 2; ++v) {
          const int64_t cc = c + 8 * v;
          __m256 y = _mm256_fmadd_ps(acc[i][v], va, bias ? _mm256_loadu_ps(bias + cc) : _mm256_setzero_ps());
          if (drop.active) {
            y = _mm256_and_ps(_mm256_mul_ps(y, vs), dropout_keep8(keys[i], static_cast<uint32_t>(cc), drop.threshold));
          }
          float* o = out + (m0 + i) * ldo + cc;
          _mm256_storeu_ps(o, accumulate ? _mm256_add_ps(_mm256_loadu_ps(o), y) : y);
        }
      }
    }
    for (int64_t i = 0; i < nr; ++i) {  // column tail
      for (int64_t c = D16; c < D; ++c) {
        float acc = 0.0f;
        for (int64_t j = 0; j < r; ++j) acc += gr[i][j] * P[j * ldp + c];
        float v = acc * alpha + (bias ? bias[c] : 0.0f);
        if (drop.active) v = dropout_keep(keys[i], static_cast<uint32_t>(c), drop.threshold) ? v * drop.scale : 0.0f;
        out[(m0 + i) * ldo + c] = accumulate ? out[(m0 + i) * ldo + c] + v : v;
      }
    }
  }
}

}  // namespace

void x_pt(const float* X, int64_t ldx, int64_t M, int64_t D, const float* P, int64_t sp0, int64_t sp1, int64_t r,
          float alpha, const Dropout& drop, float* out) {
  if (M == 0) return;
  const int64_t RP = round_up(r, 8);
  std::vector<float> Pt(static_cast<size_t>(D * RP), 0.0f);  // Pᵀ packed [D, RP], zero-padded columns
  for (int64_t j = 0; j < r; ++j)
    for (int64_t k = 0; k < D; ++k) Pt[k * RP + j] = P[j * sp0 + k * sp1];
  at::parallel_for(0, (M + 3) / 4, 4, [&](int64_t g0, int64_t g1) {
    x_pt_groups(X, ldx, M, D, Pt.data(), RP, r, alpha, drop, out, g0, g1);
  });
}

void gt_x(const float* G, int64_t ldg, int64_t r, const float* X, int64_t ldx, int64_t M, int64_t D, float alpha,
          const Dropout& drop, float* out, int64_t ldo) {
  const int64_t RP = round_up(r, 8);
  std::vector<float> Gp(static_cast<size_t>(M * RP), 0.0f);  // G packed [M, RP], zero-padded
  for (int64_t m = 0; m < M; ++m) std::copy(G + m * ldg, G + m * ldg + r, Gp.data() + m * RP);
  at::parallel_for(0, (D + 15) / 16, 8, [&](int64_t b0, int64_t b1) {
    gt_x_panels(Gp.data(), RP, r, X, ldx, M, D, alpha, drop, out, ldo, b0, b1);
  });
}

void g_p(const float* G, int64_t ldg, int64_t M, int64_t r, const float* P, int64_t ldp, int64_t D,
         const float* bias, float alpha, const Dropout& drop, bool accumulate, float* out, int64_t ldo) {
  at::parallel_for(0, (M + 3) / 4, 4, [&](int64_t g0, int64_t g1) {
    g_p_groups(G, ldg, M, r, P, ldp, D, bias, alpha, drop, accumulate, out, ldo, g0, g1);
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
          float*) {
  TORCH_CHECK(false, "skinny::x_pt: built without AVX2 kernels");
}
void gt_x(const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, float, const Dropout&, float*,
          int64_t) {
  TORCH_CHECK(false, "skinny::gt_x: built without AVX2 kernels");
}
void g_p(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, float,
         const Dropout&, bool, float*, int64_t) {
  TORCH_CHECK(false, "skinny::g_p: built without AVX2 kernels");
}
}  // namespace skinny
}  // namespace cpu
}  // namespace pyhappy

#endif
