// C++ CPU kernels of pyhappy::tt_linear's TT-matrix contractions (pyhappy/ops/tt_linear.py):
//
//   tt_contract_cpu(x, cores, s, y, chunk)        y += s·x·ΔWᵀ (the forward's contraction, _k_chain)
//   tt_env_backward_cpu(x, dy, cores, s, ...)     [s·dy·ΔW, dG_1..dG_d] (the backward, _env_backward)
//
// Both run the whole loop over row chunks here: chunks in parallel (one per thread at a time, its
// states in that core's cache), each chunk's batched products single-threaded, no Python between
// them (a Python loop adds a fixed cost to every chunk; see benchmarks/README.md, "Design
// measurements", "TT-matrix contractions"). The products are two kinds, also exposed as test hooks:
//   tt_bapply_cpu(G [P, Q], V [B, Q, S]) -> out [B, P, S],   out[b] = G · V[b]
//   tt_bpair_cpu(F [B, P, S], Z [B, Q, S]) -> C [P, Q],     C = Σ_b F[b] · Z[b]ᵀ   (fp32 sums)
//
// Where the time goes: at 4096², cores 16³, tt_rank 4 the states are [B = M·16, 64, 16]. BLAS runs
// such a batch as thousands of 64×64×16 calls (torch's bmm runs them far below the machine's GEMM
// throughput, and needs a [B, P, Q] stack or a permute copy for the pair), a poor fraction of the
// machine for ~1 GFLOP per state. These kernels keep G (or the pair's register tile) resident and
// stream the batch once:
//   apply, S ≥ 2: per b a register-blocked G·V[b] (MR rows of G × NV vectors along s);
//   apply, S = 1: one GEMM V·Gᵀ, vectorised along p (Gᵀ packed once);
//   pair,  S = 1: Fᵀ·Z by the same register tiles, outer products along b, vectors along q;
//   pair,  S ≥ 2: the contraction runs along s inside the vector lanes: a PR×QR tile of lane-wise
//          partial sums F[b, p, s-vec]·Z[b, q, s-vec] stays in registers over a block of b, is
//          folded into a per-thread lane scratch [P, Q, W], and the lanes are summed once at the end;
//   S = 16 on AVX-512 (one zmm a row, the middle cores' states at 16³), both as outer products
//          with one operand transposed by 16×16 in-register transposes: the pair over Z[b]ᵀ
//          (vectors along q, no lane scratch), the apply into T = V[b]ᵀ·Gᵀ (vectors along p, G's
//          transpose packed once) transposed back. Both take less time than the general S ≥ 2
//          forms above; the in-register transposes are what make the pair pay (with a scalar
//          transpose it is slower than the general form; figures in the same section).
// Vector tails (S or P not a multiple of the width) use masked loads/stores. AVX2+FMA and
// AVX-512F bodies come from one template; without AVX2 the same loops run their products on ATen.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/parallel.h"

#if PYHAPPY_HAVE_AVX2_KERNELS
#include <immintrin.h>
#endif

namespace pyhappy {
namespace cpu {
namespace {

// Rows of b whose transposed Z the AVX-512 S = 16 pair holds at a time (64 · 16 · Q floats: 256 KiB
// at Q = 64).
constexpr int64_t kPair16Block = 64;

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
  /* C [P, Q] (fp32) += Σ over b in [b0, b1) of F[b]·Z[b]ᵀ, through a lane scratch of P·Q·W floats. */          \
  void pair_range(const float* F, const float* Z, int64_t P, int64_t Q, int64_t S, int64_t b0, int64_t b1,       \
                  float* C, float* lanes) {                                                                       \
    float* scratch = lanes;                                                                                       \
    std::fill(scratch, scratch + P * Q * V::W, 0.0f);                                                             \
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
              float* d = scratch + ((p + i) * Q + q + j) * V::W;                                                  \
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

// The pair at S = 16 (one zmm a row) as outer products: Z[b] [Q, 16] transposed in registers into
// Zt [16, Q] (q contiguous), then C[p, q-vectors] += F[b, p, s] (broadcast) · Zt[s, q-vectors] with
// a 6 × NQ tile of sums held over a whole block of b (no lane scratch to fold).
inline void transpose16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ld_dst, r[i]);
}

template <int NQ>
__attribute__((noinline)) void pair16_tile(const float* F, const float* Zt, int64_t P, int64_t nb, int64_t p0,
                                           int64_t pn, float* C) {
  constexpr int PT = 6;
  constexpr int64_t Q = NQ * 16;
  __m512 acc[PT][NQ];
  _Pragma("GCC unroll 32") for (int i = 0; i < PT; ++i)
    _Pragma("GCC unroll 32") for (int v = 0; v < NQ; ++v) acc[i][v] = _mm512_setzero_ps();
  const float* f[PT];
  _Pragma("GCC unroll 32") for (int i = 0; i < PT; ++i) f[i] = F + (p0 + std::min<int64_t>(i, pn - 1)) * 16;
  for (int64_t b = 0; b < nb; ++b) {
    const float* zb = Zt + b * 16 * Q;
    const int64_t fo = b * P * 16;
    for (int s = 0; s < 16; ++s) {
      __m512 z[NQ];
      _Pragma("GCC unroll 32") for (int v = 0; v < NQ; ++v) z[v] = _mm512_loadu_ps(zb + s * Q + v * 16);
      _Pragma("GCC unroll 32") for (int i = 0; i < PT; ++i) {
        const __m512 fs = _mm512_set1_ps(f[i][fo + s]);
        _Pragma("GCC unroll 32") for (int v = 0; v < NQ; ++v) acc[i][v] = _mm512_fmadd_ps(fs, z[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < pn; ++i)
    _Pragma("GCC unroll 32") for (int v = 0; v < NQ; ++v) {
      float* c = C + (p0 + i) * Q + v * 16;
      _mm512_storeu_ps(c, _mm512_add_ps(_mm512_loadu_ps(c), acc[i][v]));
    }
}

// C [P, Q] += Σ_b F[b] · Z[b]ᵀ for S = 16 and Q in {16, 32, 48, 64}; zt: kPair16Block · 16 · Q floats.
template <int NQ>
void pair16_range(const float* F, const float* Z, int64_t P, int64_t B, float* C, float* zt) {
  constexpr int64_t Q = NQ * 16, blk = kPair16Block;
  for (int64_t bb = 0; bb < B; bb += blk) {
    const int64_t nb = std::min(blk, B - bb);
    for (int64_t b = 0; b < nb; ++b)
      for (int v = 0; v < NQ; ++v) transpose16(Z + ((bb + b) * Q + v * 16) * 16, 16, zt + b * 16 * Q + v * 16, Q);
    for (int64_t p = 0; p < P; p += 6) pair16_tile<NQ>(F + bb * P * 16, zt, P, nb, p, std::min<int64_t>(6, P - p), C);
  }
}

// The apply at S = 16 the same way round: T[s, p] = Σ_q V[b, q, s] · Gᵀ[q, p] with NS values of s
// broadcast against NP vectors of p (sums held over all q), then T [16, P] transposed in registers
// into out[b] [P, 16].
template <int NS, int NP>
__attribute__((noinline)) void apply16_tile(const float* GT, int64_t Q, const float* Vb, int s0, float* T) {
  constexpr int64_t P = NP * 16;
  __m512 acc[NS][NP];
  _Pragma("GCC unroll 32") for (int j = 0; j < NS; ++j)
    _Pragma("GCC unroll 32") for (int v = 0; v < NP; ++v) acc[j][v] = _mm512_setzero_ps();
  for (int64_t q = 0; q < Q; ++q) {
    __m512 g[NP];
    _Pragma("GCC unroll 32") for (int v = 0; v < NP; ++v) g[v] = _mm512_loadu_ps(GT + q * P + v * 16);
    const float* vq = Vb + q * 16 + s0;
    _Pragma("GCC unroll 32") for (int j = 0; j < NS; ++j) {
      const __m512 x = _mm512_set1_ps(vq[j]);
      _Pragma("GCC unroll 32") for (int v = 0; v < NP; ++v) acc[j][v] = _mm512_fmadd_ps(x, g[v], acc[j][v]);
    }
  }
  _Pragma("GCC unroll 32") for (int j = 0; j < NS; ++j)
    _Pragma("GCC unroll 32") for (int v = 0; v < NP; ++v) _mm512_storeu_ps(T + (s0 + j) * P + v * 16, acc[j][v]);
}

template <int NP>
void apply16_range(const float* GT, int64_t Q, const float* V, int64_t B, float* O) {
  constexpr int64_t P = NP * 16;
  alignas(64) float T[16 * P];
  for (int64_t b = 0; b < B; ++b) {
    const float* Vb = V + b * Q * 16;
    apply16_tile<6, NP>(GT, Q, Vb, 0, T);
    apply16_tile<6, NP>(GT, Q, Vb, 6, T);
    apply16_tile<4, NP>(GT, Q, Vb, 12, T);
    for (int v = 0; v < NP; ++v) transpose16(T + v * 16, P, O + b * P * 16 + v * 256, 16);
  }
}

// out [B, P, 16] = G · V[b] for P in {16, 32, 48, 64} (GT = Gᵀ [Q, P]); false for other P.
bool apply16(const float* GT, int64_t P, int64_t Q, const float* V, int64_t B, float* O) {
  switch (P) {
    case 16: apply16_range<1>(GT, Q, V, B, O); return true;
    case 32: apply16_range<2>(GT, Q, V, B, O); return true;
    case 48: apply16_range<3>(GT, Q, V, B, O); return true;
    case 64: apply16_range<4>(GT, Q, V, B, O); return true;
    default: return false;
  }
}

bool pair16(const float* F, const float* Z, int64_t B, int64_t P, int64_t Q, float* C, float* zt) {
  switch (Q) {
    case 16: pair16_range<1>(F, Z, P, B, C, zt); return true;
    case 32: pair16_range<2>(F, Z, P, B, C, zt); return true;
    case 48: pair16_range<3>(F, Z, P, B, C, zt); return true;
    case 64: pair16_range<4>(F, Z, P, B, C, zt); return true;
    default: return false;
  }
}
}  // namespace avx512
#pragma GCC pop_options

#undef PYHAPPY_TT_KERNELS

void gemm_rows(const float* A, int64_t ai, int64_t al, const float* Bm, int64_t ldb, float* C, int64_t ldc,
               int64_t i0, int64_t i1, int64_t J, int64_t L) {
  if (use_avx512()) return avx512::gemm_rows(A, ai, al, Bm, ldb, C, ldc, i0, i1, J, L);
  avx2::gemm_rows(A, ai, al, Bm, ldb, C, ldc, i0, i1, J, L);
}

void pair_range(const float* F, const float* Z, int64_t P, int64_t Q, int64_t S, int64_t b0, int64_t b1, float* C,
                float* lanes) {
  if (use_avx512()) return avx512::pair_range(F, Z, P, Q, S, b0, b1, C, lanes);
  avx2::pair_range(F, Z, P, Q, S, b0, b1, C, lanes);
}

#endif  // PYHAPPY_HAVE_AVX2_KERNELS

// Splits [0, n) into at most the thread count's chunks: (chunk count, chunk size).
std::pair<int64_t, int64_t> split(int64_t n) {
  if (n <= 0) return {0, 1};
  const int64_t t = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  const int64_t c = (n + t - 1) / t;
  return {(n + c - 1) / c, c};
}

// ---- the whole contraction in C++: row chunks in parallel, each chunk's products single-threaded ----

// out [B, P, S] = G [P, Q] · V[b] for every b; GT = Gᵀ [Q, P] (contiguous) serves S = 1.
void apply_st(const float* G, const float* GT, int64_t P, int64_t Q, const float* V, int64_t B, int64_t S, float* O) {
#if PYHAPPY_HAVE_AVX2_KERNELS
  if (use_avx2()) {
    if (S == 1) {
      gemm_rows(V, Q, 1, GT, P, O, P, 0, B, P, Q);
    } else if (!(S == 16 && use_avx512() && avx512::apply16(GT, P, Q, V, B, O))) {
      for (int64_t b = 0; b < B; ++b) gemm_rows(G, Q, 1, V + b * Q * S, S, O + b * P * S, S, 0, P, S, Q);
    }
    return;
  }
#endif
  const auto f = at::TensorOptions().dtype(at::kFloat);
  at::Tensor o = at::from_blob(O, {B, P, S}, f);
  o.copy_(at::matmul(at::from_blob(const_cast<float*>(G), {P, Q}, f), at::from_blob(const_cast<float*>(V), {B, Q, S}, f)));
}

// Floats of scratch pair_add_st needs for a [P, Q] pair.
constexpr int64_t pair_scratch(int64_t P, int64_t Q) { return std::max(P * Q * 16, kPair16Block * 16 * Q); }

// C [P, Q] += Σ_b F[b] · Z[b]ᵀ for F [B, P, S], Z [B, Q, S]; tmp: pair_scratch(P, Q) floats.
void pair_add_st(const float* F, const float* Z, int64_t B, int64_t P, int64_t Q, int64_t S, float* C, float* tmp) {
#if PYHAPPY_HAVE_AVX2_KERNELS
  if (use_avx2()) {
    if (S == 1) {  // C += Fᵀ·Z: outer products along b, vectors along q
      gemm_rows(F, 1, P, Z, Q, tmp, Q, 0, P, Q, B);
      for (int64_t i = 0; i < P * Q; ++i) C[i] += tmp[i];
    } else if (!(S == 16 && use_avx512() && avx512::pair16(F, Z, B, P, Q, C, tmp))) {
      pair_range(F, Z, P, Q, S, 0, B, C, tmp);
    }
    return;
  }
#endif
  const auto f = at::TensorOptions().dtype(at::kFloat);
  at::from_blob(C, {P, Q}, f).add_(at::einsum("bps,bqs->pq", {at::from_blob(const_cast<float*>(F), {B, P, S}, f),
                                                               at::from_blob(const_cast<float*>(Z), {B, Q, S}, f)}));
}

// The cores of a TT-matrix [r_{i-1}, n_i, k_i, r_i] as the two applied matrices: gk [(n r1), (r k)]
// (the x side, contracting k_i) and gn = gkᵀ [(r k), (n r1)] (the dy side, contracting n_i).
struct Chain {
  std::vector<int64_t> r, n, k, r1;
  std::vector<at::Tensor> gk, gn;
  int64_t d = 0, Np = 1, Kp = 1;
  explicit Chain(at::TensorList cores, const char* op) {
    d = static_cast<int64_t>(cores.size());
    TORCH_CHECK(d > 0, op, ": cores must not be empty");
    int64_t prev = 1;
    for (int64_t i = 0; i < d; ++i) {
      const at::Tensor& c = cores[i];
      TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == at::kFloat && c.dim() == 4, op, ": cores[", i,
                  "] must be a float32 CPU tensor [r_{i-1}, n_i, k_i, r_i]");
      TORCH_CHECK(c.size(0) == prev, op, ": cores[", i, "] has leading rank ", c.size(0), ", expected ", prev);
      r.push_back(c.size(0)), n.push_back(c.size(1)), k.push_back(c.size(2)), r1.push_back(c.size(3));
      prev = c.size(3);
      gk.push_back(c.permute({1, 3, 0, 2}).reshape({n[i] * r1[i], r[i] * k[i]}).contiguous());
      gn.push_back(gk.back().t().contiguous());
      Np *= n[i], Kp *= k[i];
    }
    TORCH_CHECK(prev == 1, op, ": the last core's trailing rank must be 1, got ", prev);
  }
  // Elements per row of x of the state after cores [0, i) (x side) / the dy-side state of the same
  // layout: [(n_1..n_i), r_i, (k_{i+1}..k_d)].
  int64_t state(int64_t i) const {
    int64_t e = i == 0 ? 1 : r1[i - 1];
    for (int64_t j = 0; j < i; ++j) e *= n[j];
    for (int64_t j = i; j < d; ++j) e *= k[j];
    return e;
  }
  // Z_{i+1} from Z_i for mc rows (the x-side chain, core i's k mode).
  void k_step(int64_t i, int64_t mc, const float* Zi, float* Zo) const {
    int64_t B = mc, S = 1;
    for (int64_t j = 0; j < i; ++j) B *= n[j];
    for (int64_t j = i; j < d; ++j) S *= k[j];
    apply_st(gk[i].data_ptr<float>(), gn[i].data_ptr<float>(), n[i] * r1[i], r[i] * k[i], Zi, B, S / k[i], Zo);
  }
  // F_i from F_{i+1} for mc rows (the dy-side chain, core i's n mode).
  void n_step(int64_t i, int64_t mc, const float* Fi1, float* Fo) const {
    int64_t B = mc, S = 1;
    for (int64_t j = 0; j < i; ++j) B *= n[j];
    for (int64_t j = i + 1; j < d; ++j) S *= k[j];
    apply_st(gn[i].data_ptr<float>(), gk[i].data_ptr<float>(), r[i] * k[i], n[i] * r1[i], Fi1, B, S, Fo);
  }
};

// Rows [m0, m0 + mc) of src [M, cols] into dst [mc, width], zero-padded on the right.
void pad_rows(const float* src, int64_t cols, int64_t m0, int64_t mc, int64_t width, float* dst) {
  for (int64_t m = 0; m < mc; ++m) {
    const float* a = src + (m0 + m) * cols;
    float* o = dst + m * width;
    std::copy(a, a + cols, o);
    std::fill(o + cols, o + width, 0.0f);
  }
}

// This thread's scratch of at least n floats, kept between calls (grown, never shrunk): the chunk
// states of the loops below. Fresh buffers cost their page faults and zero-fill on every call
// (~5 MiB a thread at 16 rows of a 4096² 16³ rank-4 layer), which at M=64 outweighed the products.
float* scratch(size_t n) {
  static thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// Pointers to consecutive regions of the given sizes (in floats) of this thread's scratch.
std::vector<float*> regions(const std::vector<int64_t>& sizes) {
  size_t total = 0;
  for (int64_t n : sizes) total += static_cast<size_t>(n);
  float* p = scratch(total);
  std::vector<float*> out;
  for (int64_t n : sizes) {
    out.push_back(p);
    p += n;
  }
  return out;
}

void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2, op, ": ", name,
              " must be a float32 CPU matrix, got ", t.scalar_type(), " with ", t.dim(), " dims");
}

}  // namespace

// y [M, N] += s · x·ΔWᵀ, ΔW the TT-matrix of cores, by mode-by-mode contraction in chunks of `chunk`
// rows (the states of one chunk stay in cache; chunks run in parallel).
void tt_contract_cpu(const at::Tensor& x_in, at::TensorList cores, double scaling, const at::Tensor& y, int64_t chunk) {
  const char* op = "pyhappy::tt_contract_cpu";
  check_rows(x_in, op, "x");
  check_rows(y, op, "y");
  const Chain ch(cores, op);
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  TORCH_CHECK(y.size(0) == M && y.is_contiguous(), op, ": y must be a contiguous [", M, ", N]");
  TORCH_CHECK(K <= ch.Kp && N <= ch.Np, op, ": the cores cover [", ch.Np, ", ", ch.Kp, "] but x is [", M, ", ", K,
              "] and y [", M, ", ", N, "]");
  TORCH_CHECK(chunk >= 1, op, ": chunk must be >= 1");
  if (M == 0) return;
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const float s = static_cast<float>(scaling);
  const int64_t nch = (M + chunk - 1) / chunk;
  std::vector<int64_t> sizes;
  for (int64_t i = 0; i <= ch.d; ++i) sizes.push_back(i == 0 && K == ch.Kp ? 0 : chunk * ch.state(i));
  cpu::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    const std::vector<float*> R = regions(sizes);  // Z_0..Z_d (Z_0 unused without padding)
    std::vector<const float*> Z(R.begin(), R.end());
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t m0 = c * chunk, mc = std::min(chunk, M - m0);
      if (K != ch.Kp) {
        pad_rows(X, K, m0, mc, ch.Kp, R[0]);
      } else {
        Z[0] = X + m0 * K;
      }
      for (int64_t i = 0; i < ch.d; ++i) ch.k_step(i, mc, Z[i], R[i + 1]);
      for (int64_t m = 0; m < mc; ++m) {  // Z_d is x·ΔWᵀ as [mc, Np]
        const float* z = R[ch.d] + m * ch.Np;
        float* o = Y + (m0 + m) * N;
        for (int64_t j = 0; j < N; ++j) o[j] += s * z[j];
      }
    }
  });
}

// [s·dy·ΔW [M, K], dG_1, ..., dG_d] for y = s·x·ΔWᵀ: the environment contraction of
// pyhappy/ops/tt_linear.py (_env_backward), chunks of `chunk` rows in parallel, each range of chunks
// summing its core gradients in fp32 and the ranges added in order. The first tensor is empty
// without need_dx, and also when dx is given: then s·dy·ΔW is added into dx [M, K] in place (dy·W
// already there, so dx takes no separate pass). The dy side runs unscaled (s applied to the sums and
// to dx), and rows of x / dy that need no padding are read in place.
std::vector<at::Tensor> tt_env_backward_cpu(const at::Tensor& x_in, const at::Tensor& dy_in, at::TensorList cores,
                                            double scaling, bool need_dx, int64_t chunk,
                                            const std::optional<at::Tensor>& dx) {
  const char* op = "pyhappy::tt_env_backward_cpu";
  check_rows(x_in, op, "x");
  check_rows(dy_in, op, "dy");
  const Chain ch(cores, op);
  const at::Tensor x = x_in.contiguous(), dy = dy_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = dy.size(1), d = ch.d;
  TORCH_CHECK(dy.size(0) == M, op, ": dy has ", dy.size(0), " rows but x has ", M);
  TORCH_CHECK(K <= ch.Kp && N <= ch.Np, op, ": the cores cover [", ch.Np, ", ", ch.Kp, "] but x is [", M, ", ", K,
              "] and dy [", M, ", ", N, "]");
  TORCH_CHECK(chunk >= 1, op, ": chunk must be >= 1");
  if (dx) {
    check_rows(*dx, op, "dx");
    TORCH_CHECK(need_dx && dx->size(0) == M && dx->size(1) == K && dx->is_contiguous(), op,
                ": dx must be a contiguous [", M, ", ", K, "] and need_dx true");
  }
  std::vector<int64_t> off(d + 1, 0);  // each core's gradient [n r1, r k] at off[i] of one flat row
  for (int64_t i = 0; i < d; ++i) off[i + 1] = off[i] + ch.n[i] * ch.r1[i] * ch.r[i] * ch.k[i];
  const int64_t nch = std::max<int64_t>(1, (M + chunk - 1) / chunk);
  at::Tensor part = at::zeros({nch, off[d]}, x.options());
  at::Tensor gx = need_dx && !dx ? at::empty({M, K}, x.options()) : at::empty({0}, x.options());
  const float* X = x.data_ptr<float>();
  const float* D = dy.data_ptr<float>();
  float* P = part.data_ptr<float>();
  float* GX = !need_dx ? nullptr : dx ? dx->data_ptr<float>() : gx.data_ptr<float>();
  const bool add_dx = dx.has_value();
  const float s = static_cast<float>(scaling);
  const bool pad_x = K != ch.Kp, pad_dy = N != ch.Np;
  int64_t pq_max = 0;
  for (int64_t i = 0; i < d; ++i) pq_max = std::max(pq_max, pair_scratch(ch.n[i] * ch.r1[i], ch.r[i] * ch.k[i]));
  // regions: Z_0..Z_{d-1}, F_0..F_d (F_0 empty without need_dx; Z_0 / F_d unused without padding),
  // the pair's scratch
  std::vector<int64_t> sizes;
  for (int64_t i = 0; i < d; ++i) sizes.push_back(i == 0 && !pad_x ? 0 : chunk * ch.state(i));
  for (int64_t i = 0; i <= d; ++i)
    sizes.push_back((i == 0 && !need_dx) || (i == d && !pad_dy) ? 0 : chunk * ch.state(i));
  sizes.push_back(pq_max);
  if (M > 0) {
    cpu::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
      const std::vector<float*> R = regions(sizes);
      std::vector<const float*> Z(R.begin(), R.begin() + d);
      std::vector<const float*> F(R.begin() + d, R.begin() + 2 * d + 1);
      float* tmp = R[2 * d + 1];
      float* acc = P + c0 * off[d];  // this range's partial sums (row c0 of part)
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t m0 = c * chunk, mc = std::min(chunk, M - m0);
        if (pad_x) {
          pad_rows(X, K, m0, mc, ch.Kp, R[0]);
        } else {
          Z[0] = X + m0 * K;
        }
        if (pad_dy) {
          pad_rows(D, N, m0, mc, ch.Np, R[2 * d]);
        } else {
          F[d] = D + m0 * N;
        }
        for (int64_t i = 0; i + 1 < d; ++i) ch.k_step(i, mc, Z[i], R[i + 1]);
        for (int64_t i = d - 1; i >= (need_dx ? 0 : 1); --i) ch.n_step(i, mc, F[i + 1], R[d + i]);
        int64_t B = mc, S = ch.Kp;
        for (int64_t i = 0; i < d; ++i) {  // dG_i pairs Z_{i-1} with F_i, both [B, ., S / k_i]
          S /= ch.k[i];
          pair_add_st(F[i + 1], Z[i], B, ch.n[i] * ch.r1[i], ch.r[i] * ch.k[i], S, acc + off[i], tmp);
          B *= ch.n[i];
        }
        if (need_dx)
          for (int64_t m = 0; m < mc; ++m) {
            const float* f0 = F[0] + m * ch.Kp;
            float* o = GX + (m0 + m) * K;
            if (add_dx) {
              for (int64_t j = 0; j < K; ++j) o[j] += s * f0[j];
            } else {
              for (int64_t j = 0; j < K; ++j) o[j] = s * f0[j];
            }
          }
      }
    });
  }
  const at::Tensor total = part.sum(0).mul_(scaling);
  std::vector<at::Tensor> out{gx};
  for (int64_t i = 0; i < d; ++i)
    out.push_back(total.narrow(0, off[i], off[i + 1] - off[i])
                      .view({ch.n[i], ch.r1[i], ch.r[i], ch.k[i]})
                      .permute({2, 0, 3, 1})
                      .contiguous());
  return out;
}

// Test hooks of the two batched products at the shapes the contraction runs (apply_st and
// pair_add_st above), over the batch in parallel.
at::Tensor tt_bapply_cpu(const at::Tensor& g, const at::Tensor& v) {
  const char* op = "pyhappy::tt_bapply_cpu";
  check_f32_3d(v, op, "v");
  TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == at::kFloat && g.dim() == 2, op,
              ": g must be a float32 CPU matrix [P, Q], got ", g.scalar_type(), " with ", g.dim(), " dims");
  const int64_t B = v.size(0), Q = v.size(1), S = v.size(2), P = g.size(0);
  TORCH_CHECK(g.size(1) == Q, op, ": g is [", P, ", ", g.size(1), "] but v's matrices have ", Q, " rows");
  const at::Tensor gc = g.contiguous(), gt = g.t().contiguous(), vc = v.contiguous();
  at::Tensor out = at::empty({B, P, S}, v.options());
  if (B == 0 || P == 0 || S == 0) return out;
  const float* G = gc.data_ptr<float>();
  const float* GT = gt.data_ptr<float>();
  const float* X = vc.data_ptr<float>();
  float* O = out.data_ptr<float>();
  cpu::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    apply_st(G, GT, P, Q, X + b0 * Q * S, b1 - b0, S, O + b0 * P * S);
  });
  return out;
}

at::Tensor tt_bpair_cpu(const at::Tensor& f, const at::Tensor& z) {
  const char* op = "pyhappy::tt_bpair_cpu";
  check_f32_3d(f, op, "f");
  check_f32_3d(z, op, "z");
  const int64_t B = f.size(0), P = f.size(1), S = f.size(2), Q = z.size(1);
  TORCH_CHECK(z.size(0) == B && z.size(2) == S, op, ": f is [", B, ", ", P, ", ", S, "] but z is [", z.size(0), ", ",
              Q, ", ", z.size(2), "]: the batch and last sizes must match");
  const at::Tensor fc = f.contiguous(), zc = z.contiguous();
  const float* F = fc.data_ptr<float>();
  const float* Z = zc.data_ptr<float>();
  const auto [chunks, size] = split(B);
  // One fp32 partial [P, Q] per chunk of the batch (deterministic: fixed chunks, summed in order).
  at::Tensor part = at::zeros({std::max<int64_t>(chunks, 1), P, Q}, f.options());
  float* Cp = part.data_ptr<float>();
  if (B > 0 && P > 0 && Q > 0 && S > 0) {
    cpu::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      float* tmp = scratch(static_cast<size_t>(pair_scratch(P, Q)));
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b0 = c * size, b1 = std::min(B, b0 + size);
        pair_add_st(F + b0 * P * S, Z + b0 * Q * S, b1 - b0, P, Q, S, Cp + c * P * Q, tmp);
      }
    });
  }
  return part.sum(0);
}

}  // namespace cpu
}  // namespace pyhappy

TORCH_LIBRARY_FRAGMENT(pyhappy, m) {
  m.def("tt_bapply_cpu(Tensor g, Tensor v) -> Tensor");
  m.def("tt_bpair_cpu(Tensor f, Tensor z) -> Tensor");
  m.def("tt_contract_cpu(Tensor x, Tensor[] cores, float scaling, Tensor(a!) y, int chunk) -> ()");
  m.def("tt_env_backward_cpu(Tensor x, Tensor dy, Tensor[] cores, float scaling, bool need_dx, int chunk, "
        "Tensor(a!)? dx=None) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(pyhappy, CPU, m) {
  m.impl("tt_bapply_cpu", &pyhappy::cpu::tt_bapply_cpu);
  m.impl("tt_bpair_cpu", &pyhappy::cpu::tt_bpair_cpu);
  m.impl("tt_contract_cpu", &pyhappy::cpu::tt_contract_cpu);
  m.impl("tt_env_backward_cpu", &pyhappy::cpu::tt_env_backward_cpu);
}
