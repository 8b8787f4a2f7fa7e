// The exact int4 / int3 decode kernel of pyhappy::quant_linear for bfloat16 activations on CPUs with
// AVX512-BF16 (the decode path's M <= 16 rows of x): vdpbf16ps multiplies pairs of bf16 values and
// adds both products to an fp32 accumulator, 32 multiply-adds per instruction against the fp32
// kernel's 16 per FMA.
//
// A code c (4 or 3 bits) becomes the bf16 number 128 + c with one instruction: bf16 numbers in [128, 256)
// are spaced by 1, so the bits 0x4300 | c are exactly 128 + c. Two codes of one row go into the two
// bf16 halves of a 32-bit lane: the packed word holds code j of k = 8s + j at bit 8(j&3) + 4(j>>2),
// so (w >> sh) & 0x000F000F for sh = 0, 8, 4, 12 holds the codes of (j, j + 2) = (0, 2), (1, 3),
// (4, 6), (5, 7) in its two halves, and one vpternlogd forms (w' & 0x000F000F) | 0x43004300. The
// activations are laid out once per call in the same pairs (Bf16Acts::x2), and each vdpbf16ps
// takes one broadcast pair for the 16 rows of a tile pair (tiles t and t + 1 in the two 256-bit
// halves, as tile_pair_avx512). Per 8 codes of 16 rows: three shifts, four vpternlogd, four
// vdpbf16ps per activation row, where the fp32 kernel issues eight ANDs or shifts and eight FMAs.
// int3's codes come in the same pairs from its three code planes (block_dots), two of every eight
// straddling two planes (one more shift and vpternlogd each).
//
// Exactness: a bf16 activation times 128 + c has at most 16 significant bits, so every product is
// exact in fp32 and only the fp32 sums round, as in the fp32 kernel. The offset is removed with the
// zero point: Σ x (128 + c) − (z + 128) Σ x = Σ x c − z Σ x. vdpbf16ps treats bf16 subnormals as
// zero and flushes subnormal results, so each row is first multiplied by 2^T (exact: a power of
// two, and every scaled value is again a bf16) with T such that max|x| · 2^T is in [2^62, 2^63);
// a row with max|x| outside [2^-60, 2^100), an infinity, or a nonzero |x| below 2^-120 · max|x|
// (it would leave the normal range) makes prepare_bf16_pairs refuse, and the call takes the fp32
// kernel. NaN is carried through. Results agree with the reference within fp32 rounding of sums
// whose terms are (128 + c) · x, then are rounded to bfloat16 once.
//
// csrc/cpu/quant_linear.cpp includes this file inside its `avx2` namespace, after
// quant_linear_decode_float.h (fdec::row_exponent, fdec::group_params, prefetch distances); the
// functions that run AVX-512 code carry their own target attribute, and the caller runs them only
// where use_avx512bf16() holds.

namespace bdec {

// Activation rows as bf16 pairs: x2[m, b, s, q] (32-bit words, K / 2 per row) holds the activations
// (scaled by 2^T_m) of k = 32b + 8s + {0,2}, {1,3}, {4,6}, {5,7} for q = 0..3, the first in the low
// half. xsum[m, g]: Σ of the scaled activations over group g in fp32. unscale[m] = 2^-T_m.
struct Bf16Acts {
  const uint32_t* x2;
  const float* xsum;
  const float* unscale;
};

// The 8 bf16 values at p as fp32.
inline __m256 load_bf16x8(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// Fills Bf16Acts' arrays for the M rows of x [M, K] (bf16 bits; K a multiple of 32); false, with
// nothing to use, where a row is outside the range in which the scaling above keeps every nonzero
// value a normal bf16. Rows of the arrays past M (decode_tiles' padding) are left as they are.
inline bool prepare_bf16_pairs(const uint16_t* x, int64_t M, int64_t K, int64_t group_size, uint32_t* x2,
                               float* xsum, float* unscale) {
  const int64_t G = K / group_size;
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* xr = x + m * K;
    int e = 0;
    if (!fdec::row_exponent(K, [&](int64_t k) { return load_bf16x8(xr + k); }, 120, e)) return false;
    const __m256 f = _mm256_set1_ps(std::ldexp(1.0f, 62 - e));  // exact: every product is a normal bf16
    unscale[m] = std::ldexp(1.0f, e - 62);
    uint32_t* out = x2 + m * (K / 2);
    for (int64_t g = 0; g < G; ++g) {
      __m256 s = _mm256_setzero_ps();
      for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 8) {
        const __m256 v = _mm256_mul_ps(load_bf16x8(xr + k), f);
        s = _mm256_add_ps(s, v);
        // bf16 bits of k + 0..3 and k + 4..7 in the two 128-bit lanes; per lane, words (0, 2) and
        // (1, 3) paired into dwords 0 and 1, then the lanes' dwords 0..1 gathered: the order of
        // Bf16Acts::x2.
        const __m256i b = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
        const __m256i w = _mm256_or_si256(b, _mm256_slli_epi32(_mm256_shuffle_epi32(b, 0xEE), 16));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k / 2),
                         _mm256_castsi256_si128(_mm256_permute4x64_epi64(w, 0x08)));
      }
      alignas(32) float t[8];
      _mm256_store_ps(t, s);
      xsum[m * G + g] = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    }
  }
  return true;
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// p[i][j % NQ] += the 16 code pairs j of one block (both tiles) times row i's activation pair j,
// for the block's 32 k (pair j holds k = 4(j >> 1) + (j & 1) and that + 2).
template <int FMT, int MB, int NQ>
__attribute__((target("avx2,fma,f16c,avx512f,avx512bf16"))) inline void block_dots(const uint8_t* b0,
                                                                                   const uint8_t* b1,
                                                                                   const uint32_t* xb, int64_t half,
                                                                                   __m512 (&p)[MB][NQ]) {
  // (w & mask) | bias: the code in each half of w's lanes as the bf16 number 128 + c.
  const __m512i mask = _mm512_set1_epi32(FMT == quant::kFmtInt4 ? 0x000F000F : 0x00070007);
  const __m512i bias = _mm512_set1_epi32(0x43004300);
  auto code = [&](__m512i w) { return _mm512_ternarylogic_epi32(w, mask, bias, 0xEA); };
  auto dots = [&](int j, __m512i c) {
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const __m512i xv = _mm512_set1_epi32(static_cast<int>(xb[i * half + j]));
      p[i][j % NQ] = _mm512_dpbf16_ps(p[i][j % NQ], (__m512bh)c, (__m512bh)xv);
    }
  };
  if constexpr (FMT == quant::kFmtInt4) {
    // Code j of k = 8s + j at bit 8(j&3) + 4(j>>2) of row r's word s: (w >> 0, 8, 4, 12) & 0x000F000F
    // holds the codes of (j, j + 2) = (0, 2), (1, 3), (4, 6), (5, 7) in its two halves.
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      const __m512i v = fdec::load_pair(b0, b1, 32 * s);
      // The shifts first, so that the last vpternlogd can overwrite v (it writes its first operand).
      __m512i c[4];
      c[1] = _mm512_srli_epi32(v, 8);
      c[2] = _mm512_srli_epi32(v, 4);
      c[3] = _mm512_srli_epi32(v, 12);
      c[0] = code(v);
      for (int q = 1; q < 4; ++q) c[q] = code(c[q]);
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) dots(4 * s + q, c[q]);
    }
  } else {
    // int3 (block_codes): byte 4r + kk of the three 32-byte vectors v0, v1, v2 holds, as bits
    // 3i .. 3i + 2 of v0 | v1 << 8 | v2 << 16, the code of row r at k = 4i + kk. Codes i = 2 and 5
    // straddle two vectors: their bits are merged by a bit select (vpternlogd 0xE4) first.
    const __m512i v0 = fdec::load_pair(b0, b1, 0), v1 = fdec::load_pair(b0, b1, 32), v2 = fdec::load_pair(b0, b1, 64);
    auto merge = [&](__m512i lo, __m512i hi, int lo_bits) {  // lo's low bits, hi's others
      return _mm512_ternarylogic_epi32(lo, hi, _mm512_set1_epi32(lo_bits * 0x00010001), 0xE4);
    };
    dots(0, code(v0));
    dots(1, code(_mm512_srli_epi32(v0, 8)));
    dots(2, code(_mm512_srli_epi32(v0, 3)));
    dots(3, code(_mm512_srli_epi32(v0, 11)));
    dots(4, code(merge(_mm512_srli_epi32(v0, 6), _mm512_slli_epi32(v1, 2), 0x3)));
    dots(5, code(merge(_mm512_srli_epi32(v0, 14), _mm512_srli_epi32(v1, 6), 0x3)));
    dots(6, code(_mm512_srli_epi32(v1, 1)));
    dots(7, code(_mm512_srli_epi32(v1, 9)));
    dots(8, code(_mm512_srli_epi32(v1, 4)));
    dots(9, code(_mm512_srli_epi32(v1, 12)));
    dots(10, code(merge(_mm512_srli_epi32(v1, 7), _mm512_slli_epi32(v2, 1), 0x1)));
    dots(11, code(merge(_mm512_srli_epi32(v1, 15), _mm512_srli_epi32(v2, 7), 0x1)));
    dots(12, code(_mm512_srli_epi32(v2, 2)));
    dots(13, code(_mm512_srli_epi32(v2, 10)));
    dots(14, code(_mm512_srli_epi32(v2, 5)));
    dots(15, code(_mm512_srli_epi32(v2, 13)));
  }
}

// y[m, rows of tiles t and t + 1] (t even: a pair) for m < rows (<= MB). NQ partial sums per row: 4 at up to 4
// rows, where fewer chains would leave the dot-product unit waiting on its latency; 1 at 8 rows,
// whose 8 chains are enough and whose 32 would not fit the 32 registers.
template <int FMT, int MB, int NQ>
__attribute__((target("avx2,fma,f16c,avx512f,avx512bf16"))) inline void tile_pair(const Packed& P, const Bf16Acts& a,
                                                                                  int64_t t, int rows,
                                                                                  float* y) {
  const int64_t bpg = P.group_size / kBlockK, half = P.K / 2;
  const __m256 off = _mm256_set1_ps(128.0f);
  __m256 acc0[MB], acc1[MB];
  for (int i = 0; i < MB; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  const uint8_t* b0 = P.block(t, 0);
  const uint8_t* b1 = P.block(t + 1, 0);
  for (int64_t g = 0; g < P.G; ++g) {
    __m512 p[MB][NQ];
    for (int i = 0; i < MB; ++i) {
      for (int q = 0; q < NQ; ++q) p[i][q] = _mm512_setzero_ps();
    }
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b, b0 += P.block_step, b1 += P.block_step) {
      fdec::prefetch_ahead(b0, fdec::kPairPrefetchBytes);
      fdec::prefetch_ahead(b1, fdec::kPairPrefetchBytes);
      block_dots<FMT, MB, NQ>(b0, b1, a.x2 + b * (kBlockK / 2), half, p);
    }
    __m256 s0, z0, s1, z1;
    fdec::group_params<FMT>(P, t, g, s0, z0);
    fdec::group_params<FMT>(P, t + 1, g, s1, z1);
    z0 = _mm256_add_ps(z0, off);  // z + 128
    z1 = _mm256_add_ps(z1, off);
    for (int i = 0; i < MB; ++i) {
      __m512 d = p[i][0];
      if constexpr (NQ == 4) d = _mm512_add_ps(_mm512_add_ps(p[i][0], p[i][1]), _mm512_add_ps(p[i][2], p[i][3]));
      const __m256 xs = _mm256_set1_ps(a.xsum[i * P.G + g]);
      // s · (Σ x (128 + c) − (z + 128) Σ x)
      const __m256 d0 = _mm512_castps512_ps256(d);
      acc0[i] = _mm256_fmadd_ps(s0, _mm256_fnmadd_ps(z0, xs, d0), acc0[i]);
      const __m256 d1 = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1));
      acc1[i] = _mm256_fmadd_ps(s1, _mm256_fnmadd_ps(z1, xs, d1), acc1[i]);
    }
  }
  for (int i = 0; i < rows; ++i) {
    for (int h = 0; h < 2; ++h) {
      store_tile_rows(P, y, i, t + h, _mm256_mul_ps(h ? acc1[i] : acc0[i], _mm256_set1_ps(a.unscale[i])));
    }
  }
}
#pragma GCC diagnostic pop

// y[m, n] for tiles [t0, t1) (whole pairs), m < M (1 <= M <= kDecodeMaxM). Above 4 rows, chunks of 8 rows (a
// last chunk padded with the zero rows prepare_bf16_pairs leaves there), each tile pair's chunks
// back to back so that the later ones read its codes from L2.
template <int FMT>
inline void tiles_fmt(const Packed& P, const Bf16Acts& a, int64_t M, int64_t t0, int64_t t1, float* y) {
  for (; t0 < t1; t0 += 2) {
    const int m = static_cast<int>(M);
    switch (M) {
      case 1: tile_pair<FMT, 1, 4>(P, a, t0, m, y); break;
      case 2: tile_pair<FMT, 2, 4>(P, a, t0, m, y); break;
      case 3: tile_pair<FMT, 3, 4>(P, a, t0, m, y); break;
      case 4: tile_pair<FMT, 4, 4>(P, a, t0, m, y); break;
      default:
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
          const Bf16Acts c{a.x2 + m0 * (P.K / 2), a.xsum + m0 * P.G, a.unscale + m0};
          tile_pair<FMT, 8, 1>(P, c, t0, static_cast<int>(std::min<int64_t>(8, M - m0)), y + m0 * P.N);
        }
    }
  }
}

// int4 or int3 (the caller runs nothing else here).
inline void decode_tiles(const Packed& P, const Bf16Acts& a, int64_t M, int64_t t0, int64_t t1, float* y) {
  if (P.fmt == quant::kFmtInt4) return tiles_fmt<quant::kFmtInt4>(P, a, M, t0, t1, y);
  tiles_fmt<quant::kFmtInt3>(P, a, M, t0, t1, y);
}

}  // namespace bdec
