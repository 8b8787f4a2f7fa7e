// The exact integer decode kernel of pyhappy::quant_linear for one or two rows of x on CPUs with
// AVX512-VNNI (int4, int3): the weight's codes multiplied with the activations by vpdpbusd, integer
// dot products that are exact, instead of one fp32 FMA per code.
//
// Activations. Per weight group g (group_size values of k), with 2^e_g <= max|x_g| < 2^(e_g + 1),
// each activation is held as the integer X_k = round(x_k · 2^(W - e_g)), W = 8·D - 3, so
// |X_k| < 2^(W + 1): D = 4 for fp32 (W = 29: the group's largest value to 30 significant bits, six
// more than fp32 has, so every x within 2^6 of it is represented exactly and the others are rounded
// at 2^-30 of it, far below the rounding of any sum the fp32 reference forms with it), D = 3 for
// bf16 / fp16 (W = 21: exact within 2^13, or 2^10 for fp16, of the group's largest). X_k is split
// into D signed base-256 digits, X_k = Σ_d 256^d · b_d(k), b_d in [-128, 127], stored per digit as
// int8 planes [D][K] (DigitActs::xd), and Z_d(g) = Σ_{k in g} b_d(k) per group.
//
// Dot products. vpdpbusd multiplies 4 unsigned bytes (the codes, 0..15 / 0..7) with 4 signed bytes
// (one digit of 4 consecutive activations, broadcast to every lane) and adds the 4 products into
// an int32 lane: the packed layout (csrc/quant_linear_common.h) puts a row's 4 consecutive codes in
// one 32-bit lane, so a tile pair's 16 rows fill a 512-bit register and no lane is ever reduced.
// Per group and digit, A_d = Σ_k b_d(k) · code_k is exact (|A_d| <= 128 · 15 · group_size), and so
// is T_d = A_d - zero · Z_d (the zero point, in integers: no cancellation in floats). The group's
// sum Σ_k X_k (code_k - zero) = Σ_d 256^d T_d is assembled in fp32 (three FMAs, each rounding once at
// fp32's precision) and added as y += scale_g · 2^(e_g - R) · (that), R the row's largest e_g; y is
// multiplied by 2^(R - W) once at the end (powers of two: exact). So every product is exact, and
// the result differs from the reference's only by fp32 roundings of partial sums and the rounding
// of activations far below their group's largest, within fp32 rounding of the result.
//
// Per 128 codes the loop issues 2·D vpdpbusd (D = 4: 8) and three integer operations, where the
// int4 fp32 kernel (quant_linear_decode_float.h) issues 8 FMAs and 8 ANDs and int3's converts every
// code: where a zmm vpdpbusd costs what a zmm FMA does (Zen 4), the integer kernel gains on int3
// and not on int4, so it is a candidate of the measured dispatch, not a rule (benchmarks/README.md,
// "Design measurements", "Exact integer decode").
//
// prepare returns false, and the caller takes the fp32 kernel, where the row is outside the range
// in which the scalings are exact powers of two: a NaN or Inf, max|x| outside [2^-60, 2^100), or a
// nonzero group more than 2^90 below the row's largest.
//
// csrc/cpu/quant_linear.cpp includes this file inside its `avx2` namespace and target region, after
// quant_linear_decode.h and quant_linear_decode_float.h (block_codes, load4, store_tile_rows,
// prefetch_ahead, load_pair); the functions here add the AVX-512 targets they need.

namespace ddec {

// (GCC 12's AVX-512 cast and reduce intrinsics start from an undefined vector, which -Wall reports
// as maybe-uninitialized: a false positive.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define PYHAPPY_TARGET_DIGITS __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vnni")))

// Digits per activation for x's dtype: 4 for fp32, 3 for bf16 / fp16 (converted to fp32 first).
constexpr int kDigitsFp32 = 4;
constexpr int kDigits16 = 3;

// Per row m of x (each row prepared on its own, prepare below):
struct DigitActs {
  const int8_t* xd;      // [M][D][K]: digit d of X_k of row m at xd[(m · D + d) · K + k]
  const int32_t* zsum;   // [M][G][D]: Z_d(g)
  const float* gscale;   // [M][G]: 2^(e_g - R) (0 for an all-zero group)
  const float* unscale;  // [M]: 2^(R - W)
};

// The digit planes, group digit sums and scales of one fp32 row of K values (K a multiple of
// group_size, a multiple of 32). False where the row is outside the kernel's range (above).
template <int D>
PYHAPPY_TARGET_DIGITS bool prepare(const float* x, int64_t K, int64_t group_size, int8_t* xd, int32_t* zsum,
                                   float* gscale, float& unscale) {
  constexpr int W = 8 * D - 3;
  const int64_t G = K / group_size;
  std::vector<int> eg(G);
  int R = std::numeric_limits<int>::min();
  for (int64_t g = 0; g < G; ++g) {
    __m512 m = _mm512_setzero_ps();
    for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 16) {
      const __m512 v = _mm512_abs_ps(_mm512_loadu_ps(x + k));
      // NaN (and Inf) as +Inf: max keeps it, and it fails the range test below.
      m = _mm512_max_ps(m, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v,
                                                _mm512_set1_ps(std::numeric_limits<float>::infinity())));
    }
    const float A = _mm512_reduce_max_ps(m);
    if (!(A < 0x1p100f)) return false;
    eg[g] = A > 0.0f ? std::ilogb(A) : std::numeric_limits<int>::min();
    R = std::max(R, eg[g]);
  }
  if (R == std::numeric_limits<int>::min()) R = 0;  // an all-zero row
  if (R < -60) return false;
  for (int64_t g = 0; g < G; ++g) {
    if (eg[g] != std::numeric_limits<int>::min() && eg[g] < R - 90) return false;
  }
  for (int64_t g = 0; g < G; ++g) {
    __m512i zs[D];
    for (int d = 0; d < D; ++d) zs[d] = _mm512_setzero_si512();
    const bool zero = eg[g] == std::numeric_limits<int>::min();
    // x · 2^(W - e_g) as two exact multiplications (each factor a normal float: W - e_g may be up to 179).
    const int sh = zero ? 0 : W - eg[g];
    const __m512 f1 = _mm512_set1_ps(std::ldexp(1.0f, sh / 2)), f2 = _mm512_set1_ps(std::ldexp(1.0f, sh - sh / 2));
    for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 16) {
      // cvtps rounds to nearest even (the default rounding mode)
      __m512i X = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + k), f1), f2));
#pragma GCC unroll 4
      for (int d = 0; d < D; ++d) {
        const __m512i b = _mm512_srai_epi32(_mm512_slli_epi32(X, 24), 24);  // the low byte, signed
        zs[d] = _mm512_add_epi32(zs[d], b);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(xd + d * K + k), _mm512_cvtepi32_epi8(b));
        if (d + 1 < D) X = _mm512_srai_epi32(_mm512_sub_epi32(X, b), 8);  // exact: X - b is a multiple of 256
      }
    }
    for (int d = 0; d < D; ++d) zsum[g * D + d] = _mm512_reduce_add_epi32(zs[d]);
    gscale[g] = zero ? 0.0f : std::ldexp(1.0f, eg[g] - R);
  }
  unscale = std::ldexp(1.0f, R - W);
  return true;
}

// The 16 rows of tiles t, t + 1 of group g: zero points as int32 and scales as fp32.
PYHAPPY_TARGET_DIGITS inline void pair_params(const Packed& P, int64_t t, int64_t g, __m512i& z, __m512& s) {
  const int64_t p0 = (t * P.G + g) * kTileN, p1 = ((t + 1) * P.G + g) * kTileN;
  const __m128i z8 = _mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(P.zeros + p0)),
                                        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(P.zeros + p1)));
  z = _mm512_cvtepu8_epi32(z8);
  const at::Half* sc = static_cast<const at::Half*>(P.scales);
  const __m256i h = _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + p0))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + p1)), 1);
  s = _mm512_cvtph_ps(h);
}

// The 8 code vectors of one int3 block of each tile of a pair (b0: tile t's, b1: tile t + 1's), tile
// t in the low 256 bits: c[i] byte 4r + kk of each half = code(r, 4i + kk), block_codes' vectors.
PYHAPPY_TARGET_DIGITS inline void int3_pair_codes(const uint8_t* b0, const uint8_t* b1, __m512i c[8]) {
  __m256i c0[8], c1[8];
  block_codes<quant::kFmtInt3>(b0, c0);
  block_codes<quant::kFmtInt3>(b1, c1);
  for (int i = 0; i < 8; ++i) c[i] = _mm512_inserti64x4(_mm512_castsi256_si512(c0[i]), c1[i], 1);
}

// y[m0 .. m0 + MB, rows of tiles t and t + 1] (t even, MB <= 2): both tiles' 16 rows in the lanes of
// one register, one broadcast digit per 4 activations serving all 16, every row of x against each
// code vector while it is in a register. One row keeps two accumulators per digit (even and odd
// code vectors: 2·D independent vpdpbusd chains), two rows one each (2·D chains). The pair's
// interleaved blocks are one read stream. (Three and four rows, MB·D accumulators and their
// broadcasts, spill from the 32 registers and lose to the fp32 kernel: benchmarks/README.md,
// "Design measurements", "Exact integer decode".)
template <int FMT, int D, int MB>
PYHAPPY_TARGET_DIGITS void pair_rows(const Packed& P, const DigitActs& a, int64_t m0, int64_t t, float* y) {
  constexpr int NE = MB == 1 ? 2 : 1;
  const int64_t bpg = P.group_size / kBlockK;
  const uint8_t* b0 = P.block(t, 0);
  const uint8_t* b1 = P.block(t + 1, 0);
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < P.G; ++g) {
    __m512i A[MB][D][NE];
    for (int i = 0; i < MB; ++i) {
      for (int d = 0; d < D; ++d) {
        for (int e = 0; e < NE; ++e) A[i][d][e] = _mm512_setzero_si512();
      }
    }
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b, b0 += P.block_step, b1 += P.block_step) {
      fdec::prefetch_ahead(b0, fdec::kPairPrefetchBytes);
      fdec::prefetch_ahead(b1, fdec::kPairPrefetchBytes);
      // row i's digit d of quad j of the block (k = 4j .. 4j + 3) at xq(i, d) + 4j
      auto xq = [&](int i, int d) { return a.xd + ((m0 + i) * D + d) * P.K + b * kBlockK; };
      // code vectors lo (quad j) and hi (quad j + 1) against every row's digits
      auto dot2 = [&](__m512i lo, __m512i hi, int j) {
#pragma GCC unroll 4
        for (int i = 0; i < MB; ++i) {
#pragma GCC unroll 4
          for (int d = 0; d < D; ++d) {
            A[i][d][0] = _mm512_dpbusd_epi32(A[i][d][0], lo, _mm512_set1_epi32(load4(xq(i, d) + 4 * j)));
            A[i][d][NE - 1] = _mm512_dpbusd_epi32(A[i][d][NE - 1], hi, _mm512_set1_epi32(load4(xq(i, d) + 4 * j + 4)));
          }
        }
      };
      if constexpr (FMT == quant::kFmtInt4) {
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) {  // low nibbles: quad 2s, high nibbles: quad 2s + 1
          const __m512i v = fdec::load_pair(b0, b1, 32 * s);
          dot2(_mm512_and_si512(v, m4), _mm512_and_si512(_mm512_srli_epi16(v, 4), m4), 2 * s);
        }
      } else {
        __m512i c[8];
        int3_pair_codes(b0, b1, c);
#pragma GCC unroll 4
        for (int j = 0; j < 8; j += 2) dot2(c[j], c[j + 1], j);
      }
    }
    __m512i z;
    __m512 s;
    pair_params(P, t, g, z, s);
    for (int i = 0; i < MB; ++i) {
      const int32_t* zs = a.zsum + ((m0 + i) * P.G + g) * D;
      __m512 f = _mm512_setzero_ps();
#pragma GCC unroll 4
      for (int d = D - 1; d >= 0; --d) {
        __m512i T = A[i][d][0];
        if constexpr (NE == 2) T = _mm512_add_epi32(T, A[i][d][1]);
        T = _mm512_sub_epi32(T, _mm512_mullo_epi32(z, _mm512_set1_epi32(zs[d])));
        f = d == D - 1 ? _mm512_cvtepi32_ps(T) : _mm512_fmadd_ps(f, _mm512_set1_ps(256.0f), _mm512_cvtepi32_ps(T));
      }
      acc[i] = _mm512_fmadd_ps(f, _mm512_mul_ps(s, _mm512_set1_ps(a.gscale[(m0 + i) * P.G + g])), acc[i]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    alignas(64) float rows[2 * kTileN];
    _mm512_store_ps(rows, _mm512_mul_ps(acc[i], _mm512_set1_ps(a.unscale[m0 + i])));
    store_tile_rows(P, y, m0 + i, t, _mm256_load_ps(rows));
    store_tile_rows(P, y, m0 + i, t + 1, _mm256_load_ps(rows + kTileN));
  }
}

template <int FMT, int D>
void tiles_fmt(const Packed& P, const DigitActs& a, int64_t M, int64_t t0, int64_t t1, float* y) {
  for (int64_t t = t0; t < t1; t += 2) {
    if (M == 1) {
      pair_rows<FMT, D, 1>(P, a, 0, t, y);
    } else {
      pair_rows<FMT, D, 2>(P, a, 0, t, y);
    }
  }
}

// y[m, rows of tiles [t0, t1)] (whole pairs) for all M <= 2 rows.
template <int D>
void decode_tiles(const Packed& P, const DigitActs& a, int64_t M, int64_t t0, int64_t t1, float* y) {
  if (P.fmt == quant::kFmtInt4) return tiles_fmt<quant::kFmtInt4, D>(P, a, M, t0, t1, y);
  tiles_fmt<quant::kFmtInt3, D>(P, a, M, t0, t1, y);
}

#pragma GCC diagnostic pop
#undef PYHAPPY_TARGET_DIGITS

}  // namespace ddec
