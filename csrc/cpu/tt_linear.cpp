// C++ CPU kernels of pyhappy::tt_linear: the two batched small products of the TT-matrix
// environment contraction (pyhappy/ops/tt_linear.py, _k_chain / _n_chain / _env_backward).
//
//   tt_bapply_cpu(G [P, Q], V [B, Q, S]) -> out [B, P, S],   out[b] = G · V[b]
//   tt_bpair_cpu(F [B, P, S], Z [B, Q, S]) -> C [P, Q],     C = Σ_b F[b] · Z[b]ᵀ   (fp32 sums)
//
// Where the time goes: at 4096², cores 16³, tt_rank 4 the states are [B = M·16, 64, 16]. BLAS runs
// such a batch as thousands of 64×64×16 calls (torch's bmm: ~50 GFLOP/s here, and its [B, P, Q]
// stack or a permute copy for the pair), a poor fraction of the machine for ~1 GFLOP per state.
// These kernels keep G (or the pair's register tile) resident and stream the batch once:
//   apply, S ≥ 2: per b a register-blocked G·V[b] (MR rows of G × NV vectors along s);
//   apply, S = 1: one GEMM V·Gᵀ, vectorised along p (Gᵀ packed once);
//   pair,  S = 1: one BLAS GEMM Fᵀ·Z with the contraction over b;
//   pair,  S ≥ 2: the contraction runs along s inside the vector lanes: a PR×QR tile of lane-wise
//          partial sums F[b, p, s-vec]·Z[b, q, s-vec] stays in registers over a block of b, is
//          folded into a per-thread lane scratch [P, Q, W], and the lanes are summed once at the end.
// Vector tails (S or P not a multiple of the width) use masked loads/stores. AVX2+FMA and
// AVX-512F bodies come from one template; without AVX2 the ops run the same math through ATen.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/cpu_features.h"

#if PYHAPPY_HAVE_AVX2_KERNELS
#include <immintrin.h>
#endif

namespace pyhappy {
namespace cpu {
namespace {

void check_f32_3d(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, op, ": ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be 3-D [B, rows, S], got ", t.dim(), "-D");
}

#if PYHAPPY_HAVE_AVX2_KERNELS

#define PYHAPPY_TT_KERNELS                                                                                        \
  /* res[i][j] = Σ_l A[i·ai + l·al] · Bm[l·ldb + j] for i < MR, j < NV·W (columns >= cols read as 0). */      \
  /* The fixed loops are unrolled by pragma and the sums stored to the local res with constant */              \
  /* indices: otherwise g++ 12 at -O3 kept acc[][] in memory, storing all of it on every step of l. */           \
  template <int MR, int NV>                                                                                       \
  __attribute__((noinline)) void tile(const float* A, int64_t ai, int64_t al, const float* Bm, int64_t ldb,       \
                                      int64_t rows, int64_t cols, int64_t L, float* res) {                       \
    typename V::T acc[MR][NV];                                                                                    \
    _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i)                                                                                  \
      _Pragma("GCC unroll 32") for (int v = 0; v < NV; ++v) acc[i][v] = V::zero();                                                         \
    const float* a[MR];                                                                                           \
    _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i) a[i] = A + std::min<int64_t>(i, rows - 1) * ai; /* tail rows: not copied */     \
    typename V::M mask[NV];                                                                                       \
    _Pragma("GCC unroll 32") for (int v = 0; v < NV; ++v) mask[v] = V::mask(cols - v * V::W);                                              \
    for (int64_t l = 0; l < L; ++l) {                                                                             \
      typename V::T b[NV];                                                                                        \
      _Pragma("GCC unroll 32") for (int v = 0; v < NV; ++v) b[v] = V::loadm(Bm + l * ldb + v * V::W, mask[v]);                             \
      _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i) {                                                                              \
        const typename V::T s = V::set1(a[i][l * al]);                                                            \
        _Pragma("GCC unroll 32") for (int v = 0; v < NV; ++v) acc[i][v] = V::fma(s, b[v], acc[i][v]);                                      \
      }                                                                                                           \
    }                                                                                                             \
    _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i)                                                                                  \
      _Pragma("GCC unroll 32") for (int v = 0; v < NV; ++v) V::store(res + (i * NV + v) * V::W, acc[i][v]);                                \
  }                                                                                                               \
                                                                                                                  \
  /* The rows [i0, i1) of C for all J columns, tile by tile. */                                                   \
  void gemm_rows(const float* A, int64_t ai, int64_t al, const float* Bm, int64_t ldb, float* C, int64_t ldc,     \
                 int64_t i0, int64_t i1, int64_t J, int64_t L) {                                                  \
    constexpr int64_t kCols = kNV * V::W;                                                                         \
    alignas(64) float res[kMR * kCols];                                                                           \
    for (int64_t i = i0; i < i1; i += kMR)                                                                        \
      for (int64_t j = 0; j < J; j += kCols) {                                                                    \
        const int64_t rows = std::min<int64_t>(kMR, i1 - i), cols = std::min<int64_t>(kCols, J - j);              \
        const int64_t nv = cols > V::W ? kNV : 1;                                                                 \
        if (nv == kNV)                                                                                            \
          tile<kMR, kNV>(A + i * ai, ai, al, Bm + j, ldb, rows, cols, L, res);                                   \
        else                                                                                                      \
          tile<kMR, 1>(A + i * ai, ai, al, Bm + j, ldb, rows, cols, L, res);                                     \
        for (int64_t r = 0; r < rows; ++r)                                                                        \
          std::copy(res + r * nv * V::W, res + r * nv * V::W + cols, C + (i + r) * ldc + j);                      \
      }                                                                                                           \
  }                                                                                                               \
                                                                                                                  \
  /* Lane-wise partial sums acc[p][q] += F[b, p, s·] · Z[b, q, s·] over b in [b0, b1), all s, for the            \
     PR×QR tile at (p0, q0), added into scratch [P, Q, W]. */                                                    \
  template <int PR, int QR>                                                                                       \
  __attribute__((noinline)) void pair_tile(const float* F, const float* Z, int64_t P, int64_t Q, int64_t S,       \
                                           int64_t b0, int64_t b1, int64_t p0, int64_t q0, int64_t pn,            \
                                           int64_t qn, float* res) {                                              \
    typename V::T acc[PR][QR];                                                                                    \
    _Pragma("GCC unroll 32") for (int i = 0; i < PR; ++i)                                                                                  \
      _Pragma("GCC unroll 32") for (int j = 0; j < QR; ++j) acc[i][j] = V::zero();                                                         \
    int64_t pr[PR], qr[QR];                                                                                       \
    _Pragma("GCC unroll 32") for (int i = 0; i < PR; ++i) pr[i] = p0 + std::min<int64_t>(i, pn - 1);                                       \
    _Pragma("GCC unroll 32") for (int j = 0; j < QR; ++j) qr[j] = q0 + std::min<int64_t>(j, qn - 1);                                       \
    for (int64_t b = b0; b < b1; ++b) {                                                                           \
      const float* Fb = F + b * P * S;                                                                            \
      const float* Zb = Z + b * Q * S;                                                                            \
      for (int64_t s = 0; s < S; s += V::W) {                                                                     \
        const typename V::M m = V::mask(S - s);                                                                   \
        typename V::T z[QR];                                                                                      \
        _Pragma("GCC unroll 32") for (int j = 0; j < QR; ++j) z[j] = V::loadm(Zb + qr[j] * S + s, m);                                      \
        _Pragma("GCC unroll 32") for (int i = 0; i < PR; ++i) {                                                                            \
          const typename V::T f = V::loadm(Fb + pr[i] * S + s, m);                                                \
          _Pragma("GCC unroll 32") for (int j = 0; j < QR; ++j) acc[i][j] = V::fma(f, z[j], acc[i][j]);                                    \
        }                                                                                                         \
      }                                                                                                           \
    }                                                                                                             \
    _Pragma("GCC unroll 32") for (int i = 0; i < PR; ++i)                                                                                  \
      _Pragma("GCC unroll 32") for (int j = 0; j < QR; ++j) V::store(res + (i * QR + j) * V::W, acc[i][j]);                                \
  }                                                                                                               \
                                                                                                                  \
  /* C [P, Q] (fp32) += Σ over b in [b0, b1) of F[b]·Z[b]ᵀ, through a lane scratch. */                            \
  void pair_range(const float* F, const float* Z, int64_t P, int64_t Q, int64_t S, int64_t b0, int64_t b1,       \
                  float* C) {                                                                                     \
    std::vector<float> scratch(static_cast<size_t>(P * Q * V::W), 0.0f);                                          \
    alignas(64) float res[kPR * kQR * V::W];                                                                      \
    /* A block of b whose F and Z rows stay in L2 while every tile of (p, q) passes over it. */                  \
    const int64_t blk = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, (P + Q) * S * 4));                 \
    for (int64_t bb = b0; bb < b1; bb += blk) {                                                                   \
      const int64_t be = std::min(b1, bb + blk);                                                                  \
      for (int64_t p = 0; p < P; p += kPR)                                                                        \
        for (int64_t q = 0; q < Q; q += kQR) {                                                                    \
          const int64_t pn = std::min<int64_t>(kPR, P - p), qn = std::min<int64_t>(kQR, Q - q);                   \
          pair_tile<kPR, kQR>(F, Z, P, Q, S, bb, be, p, q, pn, qn, res);                                          \
          for (int64_t i = 0; i < pn; ++i)                                                                        \
            for (int64_t j = 0; j < qn; ++j) {                                                                    \
              float* d = scratch.data() + ((p + i) * Q + q + j) * V::W;                                           \
              V::store(d, V::add(V::load(d), V::load(res + (i * kQR + j) * V::W)));                               \
            }                                                                                                     \
        }                                                                                                         \
    }                                                                                                             \
    for (int64_t i = 0; i < P * Q; ++i) {                                                                         \
      float t = 0.0f;                                                                                             \
      for (int w = 0; w < V::W; ++w) t += scratch[i * V::W + w];                                                  \
      C[i] += t;                                                                                                  \
    }                                                                                                             \
  }

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct V {
  using T = __m256;
  using M = __m256i;
  static constexpr int W = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float f) { return _mm256_set1_ps(f); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  // Lanes [0, n) on (n clamped to [0, W]).
  static M mask(int64_t n) {
    const int k = static_cast<int>(std::clamp<int64_t>(n, 0, W));
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static T loadm(const float* p, M m) { return _mm256_maskload_ps(p, m); }
  static void storem(float* p, T v, M m) { _mm256_maskstore_ps(p, m, v); }
};
constexpr int kMR = 6, kNV = 2;  // 12 accumulators + 2 loads + 1 broadcast of 16 ymm
constexpr int kPR = 2, kQR = 4;  // 8 accumulators + 4 + 1 loads
PYHAPPY_TT_KERNELS
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f")
namespace avx512 {
struct V {
  using T = __m512;
  using M = __mmask16;
  static constexpr int W = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float f) { return _mm512_set1_ps(f); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static M mask(int64_t n) {
    const int k = static_cast<int>(std::clamp<int64_t>(n, 0, W));
    return static_cast<M>((1u << k) - 1u);
  }
  static T loadm(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static void storem(float* p, T v, M m) { _mm512_mask_storeu_ps(p, m, v); }
};
constexpr int kMR = 8, kNV = 2;  // 16 accumulators of 32 zmm
constexpr int kPR = 4, kQR = 4;  // 16 accumulators + 5 loads
PYHAPPY_TT_KERNELS
}  // namespace avx512
#pragma GCC pop_options

#undef PYHAPPY_TT_KERNELS

void gemm_rows(const float* A, int64_t ai, int64_t al, const float* Bm, int64_t ldb, float* C, int64_t ldc,
               int64_t i0, int64_t i1, int64_t J, int64_t L) {
  if (use_avx512()) return avx512::gemm_rows(A, ai, al, Bm, ldb, C, ldc, i0, i1, J, L);
  avx2::gemm_rows(A, ai, al, Bm, ldb, C, ldc, i0, i1, J, L);
}

void pair_range(const float* F, const float* Z, int64_t P, int64_t Q, int64_t S, int64_t b0, int64_t b1, float* C) {
  if (use_avx512()) return avx512::pair_range(F, Z, P, Q, S, b0, b1, C);
  avx2::pair_range(F, Z, P, Q, S, b0, b1, C);
}

#endif  // PYHAPPY_HAVE_AVX2_KERNELS

// Splits [0, n) into at most the thread count's chunks: (chunk count, chunk size).
std::pair<int64_t, int64_t> split(int64_t n) {
  if (n <= 0) return {0, 1};
  const int64_t t = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  const int64_t c = (n + t - 1) / t;
  return {(n + c - 1) / c, c};
}

}  // namespace

at::Tensor tt_bapply_cpu(const at::Tensor& g, const at::Tensor& v) {
  const char* op = "pyhappy::tt_bapply_cpu";
  check_f32_3d(v, op, "v");
  TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == at::kFloat && g.dim() == 2, op,
              ": g must be a float32 CPU matrix [P, Q], got ", g.scalar_type(), " with ", g.dim(), " dims");
  const int64_t B = v.size(0), Q = v.size(1), S = v.size(2), P = g.size(0);
  TORCH_CHECK(g.size(1) == Q, op, ": g is [", P, ", ", g.size(1), "] but v's matrices have ", Q, " rows");
#if PYHAPPY_HAVE_AVX2_KERNELS
  if (use_avx2()) {
    const at::Tensor gc = g.contiguous(), vc = v.contiguous();
    at::Tensor out = at::empty({B, P, S}, v.options());
    if (B == 0 || P == 0 || S == 0) return out;
    const float* G = gc.data_ptr<float>();
    const float* X = vc.data_ptr<float>();
    float* O = out.data_ptr<float>();
    if (S == 1) {  // out [B, P] = V [B, Q] · Gᵀ, vectorised along p
      const at::Tensor gt = gc.t().contiguous();
      const float* GT = gt.data_ptr<float>();
      at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) { gemm_rows(X, Q, 1, GT, P, O, P, b0, b1, P, Q); });
    } else {
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) gemm_rows(G, Q, 1, X + b * Q * S, S, O + b * P * S, S, 0, P, S, Q);
      });
    }
    return out;
  }
#endif
  return at::matmul(g, v);
}

at::Tensor tt_bpair_cpu(const at::Tensor& f, const at::Tensor& z) {
  const char* op = "pyhappy::tt_bpair_cpu";
  check_f32_3d(f, op, "f");
  check_f32_3d(z, op, "z");
  const int64_t B = f.size(0), P = f.size(1), S = f.size(2), Q = z.size(1);
  TORCH_CHECK(z.size(0) == B && z.size(2) == S, op, ": f is [", B, ", ", P, ", ", S, "] but z is [", z.size(0), ", ",
              Q, ", ", z.size(2), "]: the batch and last sizes must match");
  if (S == 1 && B > 0) {
    // One GEMM Fᵀ·Z contracting over b: BLAS runs this [P, B] x [B, Q] shape at least as well as
    // the register tiles (at 4096², 16³, tt_rank 4, M=512, the 32 chunk calls of [16, 4096] x
    // [4096, 64] inside _env_backward: 12.1 ms against 13.6 ms; alone, cold: 283 against 807 us).
    return at::mm(f.reshape({B, P}).t(), z.reshape({B, Q}));
  }
#if PYHAPPY_HAVE_AVX2_KERNELS
  if (use_avx2()) {
    const at::Tensor fc = f.contiguous(), zc = z.contiguous();
    const float* F = fc.data_ptr<float>();
    const float* Z = zc.data_ptr<float>();
    const auto [chunks, size] = split(B);
    // One fp32 partial [P, Q] per chunk of the batch (deterministic: fixed chunks, summed in order).
    at::Tensor part = at::zeros({std::max<int64_t>(chunks, 1), P, Q}, f.options());
    float* Cp = part.data_ptr<float>();
    if (B > 0 && P > 0 && Q > 0 && S > 0) {
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t b0 = c * size, b1 = std::min(B, b0 + size);
          pair_range(F, Z, P, Q, S, b0, b1, Cp + c * P * Q);
        }
      });
    }
    return part.sum(0);
  }
#endif
  return at::einsum("bps,bqs->pq", {f, z});
}

}  // namespace cpu
}  // namespace pyhappy

TORCH_LIBRARY_FRAGMENT(pyhappy, m) {
  m.def("tt_bapply_cpu(Tensor g, Tensor v) -> Tensor");
  m.def("tt_bpair_cpu(Tensor f, Tensor z) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyhappy, CPU, m) {
  m.impl("tt_bapply_cpu", &pyhappy::cpu::tt_bapply_cpu);
  m.impl("tt_bpair_cpu", &pyhappy::cpu::tt_bpair_cpu);
}
