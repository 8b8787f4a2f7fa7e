// The exact SIMD decode kernel of pyhappy::quant_linear (M <= 16 rows of x; the default): one pass
// over the packed weight, its codes turned into fp32 in registers and multiplied with the fp32
// activations by FMAs in fp32, the 8 rows of a tile in the 8 lanes of one register.
//
//   int4 / int3:  y[m, n] = Σ_g scale_g · (Σ_{k in g} code_k · x_k − zero_g · Σ_{k in g} x_k)
//   nf4:          y[m, n] = Σ_g absmax_g · Σ_{k in g} NF4[code_k] · x_k
//
// Codes enter as exact small integers; NF4 values come from the 16-entry table through two 8-entry
// lane permutes and a blend on the code's top bit. int4 codes are converted two ways, so that no
// single execution port carries all of them (cvtdq2ps alone limits the kernel on AVX2 cores):
//   * six of every eight k: the code is masked in place (code · 2^sh as an integer, sh its bit
//     offset in the word) and converted with cvtdq2ps; the activation it meets was multiplied by
//     2^-sh once per call (x_scaled_int4), so the product is code · x exactly as before;
//   * the other two: the code is OR-ed into the mantissa of the float 2^23 and 2^23 subtracted
//     (integer logic and a float subtraction), which gives the code exactly.
// decode_product passes the scaled activations for int4 (and the unscaled ones, with the portable
// kernel, for a row whose largest |x| is so small that 2^-24 · x would leave the normal range). The per-group Σ x is computed once
// per call (FloatActs::xsum). Every product code · x is exact in fp32 before its rounding; the
// sums round in fp32, in a different order than the reference's, so results agree with it within
// fp32 rounding (the algebra's zero-point term adds about as much rounding as the products).
//
// csrc/cpu/quant_linear.cpp includes this file once, inside its `avx2` namespace and
// `#pragma GCC target("avx2,fma,f16c")` region, after quant_linear_decode.h (block_codes).
// The enclosing file provides Packed, FloatActs, kNF4, kTileN and kBlockK.

namespace fdec {

// int4: whether code j of a packed word (bit offset 8(j&3) + 4(j>>2)) is converted in place
// (cvtdq2ps of code · 2^sh) or through the 2^23 mantissa (j = 3, 7: offsets 24 and 28).
constexpr bool int4_in_place(int j) { return (j & 3) != 3; }

// The activation scale that matches int4_in_place: 2^-sh for the codes converted in place, else 1.
inline float int4_x_scale(int64_t k) {
  const int j = static_cast<int>(k & 7);
  return int4_in_place(j) ? std::ldexp(1.0f, -(8 * (j & 3) + 4 * (j >> 2))) : 1.0f;
}

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
  } else {
    const __m256i m4 = _mm256_set1_epi32(15);
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * s));
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const int sh = 8 * (j & 3) + 4 * (j >> 2);
        if constexpr (FMT == quant::kFmtInt4) {
          if (int4_in_place(j)) {
            sink(8 * s + j, _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15 << sh))));
          } else {
            // sh = 24 or 28: the code brought to bit 0, then 2^23 + code as a float, minus 2^23.
            const __m256i c = sh == 28 ? _mm256_srli_epi32(v, 28) : _mm256_and_si256(_mm256_srli_epi32(v, sh), m4);
            const __m256i magic = _mm256_set1_epi32(0x4B000000);
            sink(8 * s + j, _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(c, magic)), _mm256_castsi256_ps(magic)));
          }
          continue;
        }
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

inline void store_rows(const Packed& P, float* y, int64_t m, int64_t t, __m256 v) {
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

inline void prefetch_ahead(const uint8_t* blk) {
  // As the int8 kernel does (quant_linear_decode.h): the hardware prefetcher alone leaves part
  // of the read bandwidth unused. Prefetches past the end of the weight never fault.
  _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBytes), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBytes + 64), _MM_HINT_T0);
}

// y[m0 .. m0 + MB, rows of tile t], the values used straight from registers (M <= 4).
template <int FMT, int MB>
void tile_direct(const Packed& P, const FloatActs& a, int64_t m0, int64_t t, float* y, __m256 lo, __m256 hi) {
  constexpr int NA = MB == 1 ? 8 : MB == 2 ? 4 : 2;
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
  for (int i = 0; i < MB; ++i) store_rows(P, y, m0 + i, t, acc[i]);
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
  for (int64_t m = 0; m < M; ++m) store_rows(P, y, m, t, acc[m]);
}

template <int FMT>
void tiles_fmt(const Packed& P, const FloatActs& a, int64_t M, int64_t t0, int64_t t1, float* y) {
  const __m256 lo = _mm256_loadu_ps(kNF4), hi = _mm256_loadu_ps(kNF4 + 8);
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

}  // namespace fdec

// y[m, n] for tiles [t0, t1), all m < M (M <= kDecodeMaxM).
inline void decode_tiles_float(const Packed& P, const FloatActs& a, int64_t M, int64_t t0, int64_t t1, float* y) {
  if (P.fmt == quant::kFmtNF4) return fdec::tiles_fmt<quant::kFmtNF4>(P, a, M, t0, t1, y);
  if (P.fmt == quant::kFmtInt4) return fdec::tiles_fmt<quant::kFmtInt4>(P, a, M, t0, t1, y);
  fdec::tiles_fmt<quant::kFmtInt3>(P, a, M, t0, t1, y);
}
