// The exact SIMD decode kernel of pyhappy::quant_linear (M <= 16 rows of x; the default): one pass
// over the packed weight, its codes turned into fp32 in registers and multiplied with the fp32
// activations by FMAs in fp32, the 8 rows of a tile in the 8 lanes of one register.
//
//   int4 / int3:  y[m, n] = Σ_g scale_g · (Σ_{k in g} code_k · x_k − zero_g · Σ_{k in g} x_k)
//   nf4:          y[m, n] = Σ_g absmax_g · Σ_{k in g} NF4[code_k] · x_k
//
// int3 codes are converted with cvtdq2ps; NF4 values come from the 16-entry table through two
// 8-entry lane permutes and a blend on the code's top bit.
//
// int4 codes are not converted at all. A code masked in place in its packed word, code · 2^sh
// (sh its bit offset, sh + 4 <= 24), read as the bits of a float is the number code · 2^(sh - 149)
// exactly: below 2^23 the bits are a subnormal's significand, and at 2^23 the smallest exponent
// continues the same grid, so bits i < 2^24 always mean i · 2^-149. Codes 0..2 of a word are masked
// in place, codes 3..6 in the word shifted right by 4 (code 3 then at offset 20), and code 7 is that
// shifted to the bottom: one AND (or shift) per code. Each meets its activation pre-multiplied by
// 2^(T - sh) (int4_x_shift), so every FMA product is
// code · x · 2^(T - 149) with no rounding before the FMA's own, as in the unscaled arithmetic. A
// per-row T (prepare_int4_acts) keeps the scaled activations and every nonzero product in fp32's
// normal range, and the row's result is multiplied back by 2^(149 - T) once (a power of two: exact).
// This takes the conversions (a cvtdq2ps per code, which shares issue resources with the FMAs on
// AVX2 cores) out of the loop: per code, an AND (or shift) and an FMA. The subnormal operands need
// DAZ off (denormals-are-zero would read them as 0): the caller clears it around the kernel.
//
// Per code vector the int4 loop issues one AND (or shift) and one FMA; on AVX2 cores these share
// the vector ALU ports, so at M = 1 that pair bounds the loop, not the weight's bytes. At M = 1 the
// int4 kernel therefore takes two tiles at a time (tile_pair_int4): one activation broadcast for
// both tiles' FMAs, eight independent FMA chains, and two sequential read streams per thread.
//
// The per-group Σ x is computed once per call (FloatActs::xsum, for int4 scaled like the
// products). Every product code · x is exact before its rounding; the sums round in fp32, in a
// different order than the reference's, so results agree with it within fp32 rounding (the
// algebra's zero-point term adds about as much rounding as the products).
//
// csrc/cpu/quant_linear.cpp includes this file once, inside its `avx2` namespace and
// `#pragma GCC target("avx2,fma,f16c")` region, after quant_linear_decode.h (block_codes).
// The enclosing file provides Packed, FloatActs, kNF4, kTileN and kBlockK.

namespace fdec {

// int4: the bit offset at which code j of a packed word (bit offset 8(j&3) + 4(j>>2)) is read as a
// float's bits (block_values): codes 0..2 in place in the word w, codes 3..6 in place in w >> 4, and
// code 7 as (w >> 4) >> 24.
constexpr int int4_x_shift(int j) { return j == 7 ? 0 : j == 3 ? 20 : 8 * (j & 3); }

// Per block: cf = the fp32 values of one k for the tile's 8 rows, k = 0..31 in order, handed to
// sink(k, cf). 4-bit codes are read straight from the packed words (code of row r, k = 8s + j at
// bits 8(j&3) + 4(j>>2) of word (s, r)); 3-bit codes through block_codes' byte vectors.
template <int FMT, class Sink>
inline void block_values(const uint8_t* blk, __m256 lo, __m256 hi, Sink& sink) {
  if constexpr (FMT == quant::kFmtInt3) {
    __m256i c[8];
    block_codes<quant::kFmtInt3>(blk, c);  // c[i] byte 4r + kk = code(r, 4i + kk)
    const __m256i ff = _mm256_set1_epi32(0xFF);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
#pragma GCC unroll 4
      for (int kk = 0; kk < 4; ++kk) {
        __m256i v = kk == 0 ? c[i] : _mm256_srli_epi32(c[i], 8 * kk);
        if (kk != 3) v = _mm256_and_si256(v, ff);
        sink(4 * i + kk, _mm256_cvtepi32_ps(v));
      }
    }
  } else if constexpr (FMT == quant::kFmtInt4) {
    // code · 2^int4_x_shift(j) in place, its bits the float code · 2^(int4_x_shift(j) - 149). Codes
    // 0..2 come from the word, 3..6 from the word shifted by 4 (which replaces it: one live copy,
    // four masks), 7 from that shifted by 24.
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * s));
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        if (j == 3) v = _mm256_srli_epi32(v, 4);
        const __m256i c = j == 7 ? _mm256_srli_epi32(v, 24) : _mm256_and_si256(v, _mm256_set1_epi32(15 << int4_x_shift(j)));
        sink(8 * s + j, _mm256_castsi256_ps(c));
      }
    }
  } else {
    const __m256i m4 = _mm256_set1_epi32(15);
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * s));
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const int sh = 8 * (j & 3) + 4 * (j >> 2);
        const __m256i idx = sh == 0 ? v : _mm256_srli_epi32(v, sh);
        __m256 cf;
        if constexpr (FMT == quant::kFmtNF4) {
          // permutevar8x32 reads the low 3 bits of each lane, blendv the sign bit: the code's
          // bit 3 shifted there picks the upper half of the table.
          const __m256i top = sh == 28 ? v : _mm256_slli_epi32(v, 28 - sh);
          cf = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                                _mm256_castsi256_ps(top));
        } else {
          cf = _mm256_cvtepi32_ps(sh == 28 ? idx : _mm256_and_si256(idx, m4));
        }
        sink(8 * s + j, cf);
      }
    }
  }
}

// MB activation rows against one block's values, NA independent partial sums per row (an FMA's
// latency is several cycles: one chain per row would leave the FMA units idle at M = 1).
template <int MB, int NA>
struct FmaSink {
  __m256 acc[MB][NA];
  const float* x[MB];  // each row's activations at the block's first k
  inline void operator()(int k, __m256 cf) {
    for (int i = 0; i < MB; ++i) acc[i][k % NA] = _mm256_fmadd_ps(cf, _mm256_broadcast_ss(x[i] + k), acc[i][k % NA]);
  }
  inline void zero() {
    for (int i = 0; i < MB; ++i) {
      for (int a = 0; a < NA; ++a) acc[i][a] = _mm256_setzero_ps();
    }
  }
  inline __m256 sum(int i) const {
    __m256 s = acc[i][0];
    for (int a = 1; a < NA; ++a) s = _mm256_add_ps(s, acc[i][a]);
    return s;
  }
};

struct StoreSink {
  float* out;  // [32][8]
  inline void operator()(int k, __m256 cf) { _mm256_store_ps(out + 8 * k, cf); }
};

// The group's parameters of tile t for the 8 rows: scale (nf4: absmax) and zero point as fp32.
template <int FMT>
inline void group_params(const Packed& P, int64_t t, int64_t g, __m256& s, __m256& z) {
  const int64_t pi = (t * P.G + g) * kTileN;
  if constexpr (FMT == quant::kFmtNF4) {
    s = _mm256_loadu_ps(static_cast<const float*>(P.scales) + pi);
    z = _mm256_setzero_ps();
  } else {
    s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const at::Half*>(P.scales) + pi)));
    z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(P.zeros + pi))));
  }
}

// acc += s · (dot − z · Σx)  (nf4: acc += s · dot).
template <int FMT>
inline __m256 group_combine(__m256 acc, __m256 dot, __m256 s, __m256 z, float xsum) {
  if constexpr (FMT != quant::kFmtNF4) dot = _mm256_fnmadd_ps(z, _mm256_set1_ps(xsum), dot);
  return _mm256_fmadd_ps(s, dot, acc);
}

inline void store_rows(const Packed& P, const FloatActs& a, float* y, int64_t m, int64_t t, __m256 v) {
  if (a.unscale) v = _mm256_mul_ps(v, _mm256_set1_ps(a.unscale[m]));
  const int64_t n0 = t * kTileN, rows = std::min<int64_t>(kTileN, P.N - n0);
  float* yr = y + m * P.N + n0;
  if (rows == kTileN) {
    _mm256_storeu_ps(yr, v);
  } else {
    alignas(32) float tmp[kTileN];
    _mm256_store_ps(tmp, v);
    std::memcpy(yr, tmp, rows * sizeof(float));
  }
}

constexpr int64_t kInt4BlockBytes = quant::block_bytes(quant::kFmtInt4);

// tile_pair_int4 reads two streams and prefetches each further ahead than the one-stream kernels
// (benchmarks/README.md, "Design measurements", "Exact int4 decode at one row: tile pairs").
constexpr int64_t kPairPrefetchBytes = 4096;

inline void prefetch_ahead(const uint8_t* blk, int64_t ahead = kPrefetchBytes) {
  // As the int8 kernel does (quant_linear_decode.h): the hardware prefetcher alone leaves part
  // of the read bandwidth unused. Prefetches past the end of the weight never fault.
  _mm_prefetch(reinterpret_cast<const char*>(blk + ahead), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(blk + ahead + 64), _MM_HINT_T0);
}

// y[m0 .. m0 + MB, rows of tile t], the values used straight from registers (M <= 4).
template <int FMT, int MB>
void tile_direct(const Packed& P, const FloatActs& a, int64_t m0, int64_t t, float* y, __m256 lo, __m256 hi) {
  // M = 1: six partial sums: enough independent FMA chains, and with int4's four masks, the word and
  // the operands the loop's values all fit the 16 vector registers (with eight, some spill).
  constexpr int NA = MB == 1 ? 6 : MB == 2 ? 4 : 2;
  const int64_t bpg = P.group_size / kBlockK;
  __m256 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm256_setzero_ps();
  FmaSink<MB, NA> sink;
  const uint8_t* blk = P.block(t, 0);
  for (int64_t g = 0; g < P.G; ++g) {
    sink.zero();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b, blk += P.block_bytes) {
      prefetch_ahead(blk);
      for (int i = 0; i < MB; ++i) sink.x[i] = a.x + (m0 + i) * P.K + b * kBlockK;
      block_values<FMT>(blk, lo, hi, sink);
    }
    __m256 s, z;
    group_params<FMT>(P, t, g, s, z);
    for (int i = 0; i < MB; ++i) {
      acc[i] = group_combine<FMT>(acc[i], sink.sum(i), s, z, FMT == quant::kFmtNF4 ? 0.0f : a.xsum[(m0 + i) * P.G + g]);
    }
  }
  for (int i = 0; i < MB; ++i) store_rows(P, a, y, m0 + i, t, acc[i]);
}

// int4 at M = 1: tiles t and t + 1 side by side. Each activation broadcast serves both tiles'
// FMAs, four partial sums per tile give eight independent FMA chains that stay in registers next
// to both words, the broadcast, the code and the masks (one mask is reloaded from the stack: a load,
// which this loop has to spare, not an ALU op), and the two tiles' codes are two sequential read
// streams (KB · 128 bytes apart), which keeps more reads in flight than one.
inline void tile_pair_int4(const Packed& P, const FloatActs& a, int64_t t, float* y) {
  constexpr int NA = 4;
  const int64_t bpg = P.group_size / kBlockK;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m256 p0[NA], p1[NA];
  const uint8_t* b0 = P.block(t, 0);
  const uint8_t* b1 = P.block(t + 1, 0);
  for (int64_t g = 0; g < P.G; ++g) {
    for (int i = 0; i < NA; ++i) p0[i] = p1[i] = _mm256_setzero_ps();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b, b0 += kInt4BlockBytes, b1 += kInt4BlockBytes) {
      prefetch_ahead(b0, kPairPrefetchBytes);
      prefetch_ahead(b1, kPairPrefetchBytes);
      const float* x = a.x + b * kBlockK;
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + 32 * s));
        __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b1 + 32 * s));
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
          // as block_values<kFmtInt4>: codes 0..2 in place, 3..6 in the word shifted by 4, 7 by 28
          if (j == 3) {
            v0 = _mm256_srli_epi32(v0, 4);
            v1 = _mm256_srli_epi32(v1, 4);
          }
          const int k = 8 * s + j;
          const __m256 xb = _mm256_broadcast_ss(x + k);
          const __m256i m = _mm256_set1_epi32(15 << int4_x_shift(j));
          const __m256i c0 = j == 7 ? _mm256_srli_epi32(v0, 24) : _mm256_and_si256(v0, m);
          p0[k % NA] = _mm256_fmadd_ps(_mm256_castsi256_ps(c0), xb, p0[k % NA]);
          const __m256i c1 = j == 7 ? _mm256_srli_epi32(v1, 24) : _mm256_and_si256(v1, m);
          p1[k % NA] = _mm256_fmadd_ps(_mm256_castsi256_ps(c1), xb, p1[k % NA]);
        }
      }
    }
    __m256 d0 = _mm256_add_ps(_mm256_add_ps(p0[0], p0[1]), _mm256_add_ps(p0[2], p0[3]));
    __m256 d1 = _mm256_add_ps(_mm256_add_ps(p1[0], p1[1]), _mm256_add_ps(p1[2], p1[3]));
    __m256 s, z;
    group_params<quant::kFmtInt4>(P, t, g, s, z);
    acc0 = group_combine<quant::kFmtInt4>(acc0, d0, s, z, a.xsum[g]);
    group_params<quant::kFmtInt4>(P, t + 1, g, s, z);
    acc1 = group_combine<quant::kFmtInt4>(acc1, d1, s, z, a.xsum[g]);
  }
  store_rows(P, a, y, 0, t, acc0);
  store_rows(P, a, y, 0, t + 1, acc1);
}

// gacc[i] += Σ_k vals[k] · x_i[k] over one block, for MB rows.
template <int MB>
inline void fma_rows(const float* vals, const float* const* x, float* gacc) {
  FmaSink<MB, 2> sink;
  sink.zero();
  for (int i = 0; i < MB; ++i) sink.x[i] = x[i];
#pragma GCC unroll 32
  for (int k = 0; k < kBlockK; ++k) sink(k, _mm256_load_ps(vals + 8 * k));
  for (int i = 0; i < MB; ++i) _mm256_store_ps(gacc + 8 * i, _mm256_add_ps(_mm256_load_ps(gacc + 8 * i), sink.sum(i)));
}

// y[all M rows, rows of tile t] for 4 < M <= 16: each block's values computed once into an L1
// buffer, then multiplied with the rows 4 at a time.
template <int FMT>
void tile_buffered(const Packed& P, const FloatActs& a, int64_t M, int64_t t, float* y, __m256 lo, __m256 hi) {
  const int64_t bpg = P.group_size / kBlockK;
  alignas(32) float vals[kBlockK * kTileN];
  alignas(32) float gacc[quant::kDecodeMaxM * kTileN];
  __m256 acc[quant::kDecodeMaxM];
  for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  StoreSink store{vals};
  const uint8_t* blk = P.block(t, 0);
  for (int64_t g = 0; g < P.G; ++g) {
    std::fill(gacc, gacc + M * kTileN, 0.0f);
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b, blk += P.block_bytes) {
      prefetch_ahead(blk);
      block_values<FMT>(blk, lo, hi, store);
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const float* x[4];
        for (int i = 0; i < 4; ++i) x[i] = a.x + std::min<int64_t>(m0 + i, M - 1) * P.K + b * kBlockK;
        switch (std::min<int64_t>(4, M - m0)) {
          case 1: fma_rows<1>(vals, x, gacc + m0 * kTileN); break;
          case 2: fma_rows<2>(vals, x, gacc + m0 * kTileN); break;
          case 3: fma_rows<3>(vals, x, gacc + m0 * kTileN); break;
          default: fma_rows<4>(vals, x, gacc + m0 * kTileN); break;
        }
      }
    }
    __m256 s, z;
    group_params<FMT>(P, t, g, s, z);
    for (int64_t m = 0; m < M; ++m) {
      acc[m] = group_combine<FMT>(acc[m], _mm256_load_ps(gacc + m * kTileN), s, z,
                                  FMT == quant::kFmtNF4 ? 0.0f : a.xsum[m * P.G + g]);
    }
  }
  for (int64_t m = 0; m < M; ++m) store_rows(P, a, y, m, t, acc[m]);
}

template <int FMT>
void tiles_fmt(const Packed& P, const FloatActs& a, int64_t M, int64_t t0, int64_t t1, float* y) {
  const __m256 lo = _mm256_loadu_ps(kNF4), hi = _mm256_loadu_ps(kNF4 + 8);
  if (FMT == quant::kFmtInt4 && M == 1) {
    for (; t0 + 1 < t1; t0 += 2) tile_pair_int4(P, a, t0, y);  // an odd last tile: tile_direct
  }
  for (int64_t t = t0; t < t1; ++t) {
    switch (M) {
      case 1: tile_direct<FMT, 1>(P, a, 0, t, y, lo, hi); break;
      case 2: tile_direct<FMT, 2>(P, a, 0, t, y, lo, hi); break;
      case 3: tile_direct<FMT, 3>(P, a, 0, t, y, lo, hi); break;
      case 4: tile_direct<FMT, 4>(P, a, 0, t, y, lo, hi); break;
      default: tile_buffered<FMT>(P, a, M, t, y, lo, hi); break;
    }
  }
}


// Σ_{k in g} x[m, k] per row and group [M, G], in fp32 (8 partial sums per group, then added).
inline void group_sums(const float* x, int64_t M, int64_t K, int64_t group_size, float* out) {
  const int64_t G = K / group_size;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + m * K + g * group_size;
      __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
      for (int64_t k = 0; k < group_size; k += 16) {
        s0 = _mm256_add_ps(s0, _mm256_loadu_ps(xg + k));
        s1 = _mm256_add_ps(s1, _mm256_loadu_ps(xg + k + 8));
      }
      alignas(32) float t[8];
      _mm256_store_ps(t, _mm256_add_ps(s0, s1));
      out[m * G + g] = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    }
  }
}

// int4: the activations the kernel multiplies, per row m with T = 126 - e (2^e <= max|x_m| < 2^(e+1)):
// xs[m, k] = x[m, k] · 2^(T - int4_x_shift(k & 7)) (as two exact multiplications, each factor a
// normal float), xsum_scaled = xsum · 2^(T - 149), unscale[m] = 2^(149 - T). False, and nothing to
// use, when some row is outside the range where all of this is exact: max|x| not in [2^-60, 2^100)
// (Inf included), or a nonzero |x| below 2^(e - 103), whose products would be subnormal. NaN is
// carried through as it is.
inline bool prepare_int4_acts(const float* x, int64_t M, int64_t K, int64_t group_size, const float* xsum,
                              float* xs, float* xsum_scaled, float* unscale) {
  const int64_t G = K / group_size;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  alignas(32) float f2[8];
  for (int j = 0; j < 8; ++j) f2[j] = std::ldexp(1.0f, 64 - int4_x_shift(j));
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    __m256 amax = _mm256_setzero_ps(), amin = inf;
    for (int64_t k = 0; k < K; k += 8) {
      const __m256 v = _mm256_and_ps(_mm256_loadu_ps(xr + k), absmask);
      amax = _mm256_max_ps(v, amax);  // a NaN in v gives the second operand: NaN is skipped
      const __m256 nz = _mm256_blendv_ps(v, inf, _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_EQ_OQ));
      amin = _mm256_min_ps(nz, amin);
    }
    alignas(32) float hi[8], lo[8];
    _mm256_store_ps(hi, amax);
    _mm256_store_ps(lo, amin);
    float A = 0.0f, mn = std::numeric_limits<float>::infinity();
    for (int i = 0; i < 8; ++i) {
      A = std::max(A, hi[i]);
      mn = std::min(mn, lo[i]);
    }
    int e = 0;
    if (A > 0.0f) {
      if (!(A >= 0x1p-60f && A < 0x1p100f)) return false;
      e = std::ilogb(A);
      if (mn < std::ldexp(1.0f, e - 103)) return false;
    }
    const __m256 f1 = _mm256_set1_ps(std::ldexp(1.0f, 62 - e)), f2v = _mm256_load_ps(f2);
    for (int64_t k = 0; k < K; k += 8) {
      _mm256_storeu_ps(xs + m * K + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + k), f1), f2v));
    }
    const float sx = std::ldexp(1.0f, -23 - e);
    for (int64_t g = 0; g < G; ++g) xsum_scaled[m * G + g] = xsum[m * G + g] * sx;
    unscale[m] = std::ldexp(1.0f, 23 + e);
  }
  return true;
}

// Denormals-are-zero off while the int4 kernel runs (its code operands are subnormal floats), the
// thread's MXCSR restored after.
struct DazOff {
  unsigned csr;
  DazOff() : csr(_mm_getcsr()) {
    if (csr & 0x40u) _mm_setcsr(csr & ~0x40u);
  }
  ~DazOff() {
    if (csr & 0x40u) _mm_setcsr(csr);
  }
  DazOff(const DazOff&) = delete;
  DazOff& operator=(const DazOff&) = delete;
};

}  // namespace fdec

// y[m, n] for tiles [t0, t1), all m < M (M <= kDecodeMaxM).
inline void decode_tiles_float(const Packed& P, const FloatActs& a, int64_t M, int64_t t0, int64_t t1, float* y) {
  if (P.fmt == quant::kFmtNF4) return fdec::tiles_fmt<quant::kFmtNF4>(P, a, M, t0, t1, y);
  if (P.fmt == quant::kFmtInt4) return fdec::tiles_fmt<quant::kFmtInt4>(P, a, M, t0, t1, y);
  fdec::tiles_fmt<quant::kFmtInt3>(P, a, M, t0, t1, y);
}
