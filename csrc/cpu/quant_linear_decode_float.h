// The exact SIMD decode kernel of pyhappy::quant_linear (M <= 16 rows of x; the default): one pass
// over the packed weight, its codes turned into fp32 in registers and multiplied with the fp32
// activations by FMAs in fp32, the 8 rows of a tile in the 8 lanes of one register.
//
//   int4 / int3:  y[m, n] = Σ_g scale_g · (Σ_{k in g} code_k · x_k − zero_g · Σ_{k in g} x_k)
//   nf4:          y[m, n] = Σ_g absmax_g · Σ_{k in g} NF4[code_k] · x_k
//
// int4 and int3 codes are read in place as floats' bits (below). NF4 values are assembled from the
// table's bytes: four pshufb lookups of a vector of 32 codes (one per byte of the fp32 table value)
// and two levels of byte/word unpacks give the 32 values as four fp32 vectors, in a lane order of
// their own (nf4_values).
// On Zen 2 a lane-crossing permute (vpermps) costs two cycles, so the two-permutes-and-a-blend lookup
// of an 8-lane vector took ~3.9 cycles; the byte lookups take three in-lane shuffles per 8 values
// (~1.6 cycles with the FMA). The values are bit-exact, as every product is.
//
// int4 codes are not converted at all. A code masked in place in its packed word, code · 2^sh
// (sh its bit offset, sh + 4 <= 24), read as the bits of a float is the number code · 2^(sh - 149)
// exactly: below 2^23 the bits are a subnormal's significand, and at 2^23 the smallest exponent
// continues the same grid, so bits i < 2^24 always mean i · 2^-149. Codes 0..2 of a word are masked
// in place, codes 3..6 in the word shifted right by 4 (code 3 then at offset 20), and code 7 is that
// shifted to the bottom: one AND (or shift) per code. Each meets its activation pre-multiplied by
// 2^(T - sh) (int4_x_shift), so every FMA product is
// code · x · 2^(T - 149) with no rounding before the FMA's own, as in the unscaled arithmetic. A
// per-row T (prepare_scaled_acts) keeps the scaled activations and every nonzero product in fp32's
// normal range, and the row's result is multiplied back by 2^(149 - T) once (a power of two: exact).
// This takes the conversions (a cvtdq2ps per code, which shares issue resources with the FMAs on
// AVX2 cores) out of the loop: per code, an AND (or shift) and an FMA. The subnormal operands need
// DAZ off (denormals-are-zero would read them as 0): the caller clears it around the kernel.
// int3's codes, one per byte of block_codes' vectors, are read the same way: bytes 0..2 masked in
// place, byte 3 shifted to the bottom (int3_x_shift).
//
// Per code vector the int4 loop issues one AND (or shift) and one FMA; on AVX2 cores these share
// the vector ALU ports, so at M = 1 that pair bounds the loop, not the weight's bytes. At M = 1 the
// int4 kernel therefore takes two tiles at a time (tile_pair_int4; int3 likewise, tile_pair_int3):
// one activation broadcast for both tiles' FMAs, eight independent FMA chains, and one sequential
// read stream per thread (the packed layout interleaves a pair's blocks: csrc/quant_linear_common.h). On
// CPUs with AVX-512F (use_avx512) the two tiles share one 512-bit register (tile_pair_avx512,
// compiled for that target on its own): half the instructions, bit-identical results.
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

// int3: the bit offset at which the code of k = 4i + kk (kk = k & 3) is read as a float's bits from
// block_codes' vector c[i] (byte kk of each row's 32-bit lane): codes kk = 0..2 masked in place,
// kk = 3 shifted to the bottom.
constexpr int int3_x_shift(int j) { return (j & 3) == 3 ? 0 : 8 * (j & 3); }

// The bit offset of code k's value for format FMT (int4 / int3), indexed by k & 7.
template <int FMT>
constexpr int x_shift(int j) {
  return FMT == quant::kFmtInt4 ? int4_x_shift(j) : int3_x_shift(j);
}

// int4 / int3, per block: cf = the fp32 values of one k for the tile's 8 rows, k = 0..31 in order,
// handed to sink(k, cf). 4-bit codes are read straight from the packed words (code of row r,
// k = 8s + j at bits 8(j&3) + 4(j>>2) of word (s, r)); 3-bit codes through block_codes' byte vectors.
template <int FMT, class Sink>
inline void block_values(const uint8_t* blk, Sink& sink) {
  static_assert(FMT != quant::kFmtNF4, "nf4 blocks go through nf4_values");
  if constexpr (FMT == quant::kFmtInt3) {
    __m256i c[8];
    block_codes<quant::kFmtInt3>(blk, c);  // c[i] byte 4r + kk = code(r, 4i + kk)
    // code · 2^int3_x_shift(kk) in place (kk = 0..2) or shifted to the bottom (kk = 3), read as a
    // float's bits, as int4's codes are below
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
#pragma GCC unroll 4
      for (int kk = 0; kk < 4; ++kk) {
        const __m256i v =
            kk == 3 ? _mm256_srli_epi32(c[i], 24) : _mm256_and_si256(c[i], _mm256_set1_epi32(0xFF << (8 * kk)));
        sink(4 * i + kk, _mm256_castsi256_ps(v));
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
  store_tile_rows(P, y, m, t, v);
}

constexpr int64_t kInt4BlockStep = quant::block_stride(quant::kFmtInt4);

// The tile-pair kernels prefetch further ahead than the one-tile kernels: a pair's block is twice
// the bytes (benchmarks/README.md, "Design measurements", "Exact int4 decode at one row: tile pairs").
constexpr int64_t kPairPrefetchBytes = 4096;

inline void prefetch_ahead(const uint8_t* blk, int64_t ahead) {
  // As the int8 kernel does (quant_linear_decode.h, prefetch_pair_ahead): into L1 ``ahead`` bytes
  // on and into L2 kL2PrefetchBytes on. Prefetches past the end of the weight never fault.
  _mm_prefetch(reinterpret_cast<const char*>(blk + ahead), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(blk + ahead + 64), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(blk + kL2PrefetchBytes), _MM_HINT_T1);
  _mm_prefetch(reinterpret_cast<const char*>(blk + kL2PrefetchBytes + 64), _MM_HINT_T1);
}

// y[m0 .. m0 + MB, rows of tiles t and t + 1] (t even), the values used straight from registers
// (M <= 4). Group by group, the group's blocks of tile t and then of tile t + 1, so the pair's
// interleaved blocks (csrc/quant_linear_common.h) are read as one stream, each group's span once.
template <int FMT, int MB>
void pair_direct(const Packed& P, const FloatActs& a, int64_t m0, int64_t t, float* y) {
  // M = 1: six partial sums: enough independent FMA chains, and with int4's four masks, the word and
  // the operands the loop's values all fit the 16 vector registers (with eight, some spill).
  constexpr int NA = MB == 1 ? 6 : MB == 2 ? 4 : 2;
  const int64_t bpg = P.group_size / kBlockK;
  __m256 acc[2][MB];
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < MB; ++i) acc[h][i] = _mm256_setzero_ps();
  }
  FmaSink<MB, NA> sink;
  for (int64_t g = 0; g < P.G; ++g) {
    for (int h = 0; h < 2; ++h) {
      sink.zero();
      const uint8_t* blk = P.block(t + h, g * bpg);
      for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b, blk += P.block_step) {
        if (h == 0) prefetch_pair_ahead(P, blk, kPrefetchBytes);
        for (int i = 0; i < MB; ++i) sink.x[i] = a.x + (m0 + i) * P.K + b * kBlockK;
        block_values<FMT>(blk, sink);
      }
      __m256 s, z;
      group_params<FMT>(P, t + h, g, s, z);
      for (int i = 0; i < MB; ++i) {
        acc[h][i] = group_combine<FMT>(acc[h][i], sink.sum(i), s, z, a.xsum[(m0 + i) * P.G + g]);
      }
    }
  }
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < MB; ++i) store_rows(P, a, y, m0 + i, t + h, acc[h][i]);
  }
}

// One group of an int4 / int3 tile pair: its dot products d0, d1 (tiles t, t + 1) scaled and their
// zero-point terms added into the tiles' accumulators.
template <int FMT = quant::kFmtInt4>
inline void pair_group(const Packed& P, const FloatActs& a, int64_t t, int64_t g, __m256 d0, __m256 d1,
                       __m256& acc0, __m256& acc1) {
  __m256 s, z;
  group_params<FMT>(P, t, g, s, z);
  acc0 = group_combine<FMT>(acc0, d0, s, z, a.xsum[g]);
  group_params<FMT>(P, t + 1, g, s, z);
  acc1 = group_combine<FMT>(acc1, d1, s, z, a.xsum[g]);
}

// int4 at M = 1: tiles t and t + 1 side by side. Each activation broadcast serves both tiles'
// FMAs, four partial sums per tile give eight independent FMA chains that stay in registers next
// to both words, the broadcast, the code and the masks (one mask is reloaded from the stack: a load,
// which this loop has to spare, not an ALU op). The two tiles' blocks alternate in memory (the
// packed layout's tile pairs), so a pair's codes are one sequential read stream: with the tiles one
// after another (two streams per thread, KB · 128 bytes apart) the same loop took ~7% longer.
inline void tile_pair_int4(const Packed& P, const FloatActs& a, int64_t t, float* y) {
  constexpr int NA = 4;
  const int64_t bpg = P.group_size / kBlockK;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m256 p0[NA], p1[NA];
  const uint8_t* b0 = P.block(t, 0);
  const uint8_t* b1 = P.block(t + 1, 0);
  for (int64_t g = 0; g < P.G; ++g) {
    for (int i = 0; i < NA; ++i) p0[i] = p1[i] = _mm256_setzero_ps();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b, b0 += kInt4BlockStep, b1 += kInt4BlockStep) {
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
    pair_group(P, a, t, g, _mm256_add_ps(_mm256_add_ps(p0[0], p0[1]), _mm256_add_ps(p0[2], p0[3])),
               _mm256_add_ps(_mm256_add_ps(p1[0], p1[1]), _mm256_add_ps(p1[2], p1[3])), acc0, acc1);
  }
  store_rows(P, a, y, 0, t, acc0);
  store_rows(P, a, y, 0, t + 1, acc1);
}

// int3 at M = 1: tiles t and t + 1 side by side, as tile_pair_int4: each activation broadcast serves
// both tiles' FMAs, four partial sums per tile (eight independent FMA chains). The codes of both
// blocks come from block_codes (three loads and ~20 shifts and masks per tile), then each code byte
// is masked in place (or shifted to the bottom) and read as a float's bits, as block_values does.
inline void tile_pair_int3(const Packed& P, const FloatActs& a, int64_t t, float* y) {
  constexpr int NA = 4;
  const int64_t bpg = P.group_size / kBlockK;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m256 p0[NA], p1[NA];
  const uint8_t* b0 = P.block(t, 0);
  for (int64_t g = 0; g < P.G; ++g) {
    for (int i = 0; i < NA; ++i) p0[i] = p1[i] = _mm256_setzero_ps();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b, b0 += P.block_step) {
      prefetch_pair_ahead(P, b0, kPrefetchBytes);
      const float* x = a.x + b * kBlockK;
      __m256i c0[8], c1[8];
      block_codes<quant::kFmtInt3>(b0, c0);
      block_codes<quant::kFmtInt3>(b0 + P.block_bytes, c1);  // the pair's blocks alternate
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
#pragma GCC unroll 4
        for (int kk = 0; kk < 4; ++kk) {
          const int k = 4 * i + kk;
          const __m256 xb = _mm256_broadcast_ss(x + k);
          const __m256i m = _mm256_set1_epi32(0xFF << (8 * kk));
          const __m256i v0 = kk == 3 ? _mm256_srli_epi32(c0[i], 24) : _mm256_and_si256(c0[i], m);
          p0[k % NA] = _mm256_fmadd_ps(_mm256_castsi256_ps(v0), xb, p0[k % NA]);
          const __m256i v1 = kk == 3 ? _mm256_srli_epi32(c1[i], 24) : _mm256_and_si256(c1[i], m);
          p1[k % NA] = _mm256_fmadd_ps(_mm256_castsi256_ps(v1), xb, p1[k % NA]);
        }
      }
    }
    pair_group<quant::kFmtInt3>(P, a, t, g, _mm256_add_ps(_mm256_add_ps(p0[0], p0[1]), _mm256_add_ps(p0[2], p0[3])),
                                _mm256_add_ps(_mm256_add_ps(p1[0], p1[1]), _mm256_add_ps(p1[2], p1[3])), acc0, acc1);
  }
  store_rows(P, a, y, 0, t, acc0);
  store_rows(P, a, y, 0, t + 1, acc1);
}

// The rows of the next pass of the direct kernels (pair_direct, pair_direct_avx512) over a tile
// pair, ``left`` rows still to do: four at a time, the last 5 or 6 as 3 + 2 or 3 + 3 (a pass of one
// row would run its FMAs on few accumulators). Every pass after the first reads the pair's span of
// the weight again, from L1 / L2 (K = 4096 int4: 32 KiB a pair); one buffered copy of each block's
// values multiplied with all rows measured slower on AVX2 (benchmarks/README.md, "Exact int4 / int3
// decode of 5-16 rows: passes of four rows").
inline int direct_chunk(int64_t left) { return left >= 7 || left == 4 ? 4 : left >= 5 ? 3 : static_cast<int>(left); }

// ---- nf4 ------------------------------------------------------------------------------------

// The NF4 table by bytes: t[j] byte c (in both 128-bit lanes, c < 16) = byte j of the fp32 NF4[c].
struct NF4Bytes {
  __m256i t[4];
  NF4Bytes() {
    alignas(32) uint8_t b[4][32];
    for (int c = 0; c < 16; ++c) {
      uint32_t u;
      std::memcpy(&u, &kNF4[c], sizeof(u));
      for (int j = 0; j < 4; ++j) b[j][c] = b[j][c + 16] = static_cast<uint8_t>(u >> (8 * j));
    }
    for (int j = 0; j < 4; ++j) t[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(b[j]));
  }
};

// The 32 NF4 values of one nibble half of a packed 32-byte vector v (8 rows x 8 k from k0, row r's
// codes in bytes 4r..4r+3; H = 0: the low nibbles, k = k0 + kk, H = 1: the high nibbles,
// k = k0 + 4 + kk, for kk = 0..3) as four fp32 vectors: f[q] holds row q in lanes 0..3 and row q + 4
// in lanes 4..7, each at kk = 0..3 in order. Each pshufb looks up one byte of the value for all 32
// codes in place; unpacking bytes 0..7 and 8..15 of each 128-bit lane (rows 0-1 and 2-3 of that lane)
// pairs value bytes 0,1 and 2,3 into words, and unpacking words 0..3 and 4..7 pairs those into the
// values. In-lane shuffles only: three per 8 values.
template <int H>
inline void nf4_values(__m256i v, const NF4Bytes& T, __m256 f[4]) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i c = H == 0 ? _mm256_and_si256(v, m4) : _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
  const __m256i b0 = _mm256_shuffle_epi8(T.t[0], c), b1 = _mm256_shuffle_epi8(T.t[1], c);
  const __m256i b2 = _mm256_shuffle_epi8(T.t[2], c), b3 = _mm256_shuffle_epi8(T.t[3], c);
  const __m256i w01l = _mm256_unpacklo_epi8(b0, b1), w01h = _mm256_unpackhi_epi8(b0, b1);
  const __m256i w23l = _mm256_unpacklo_epi8(b2, b3), w23h = _mm256_unpackhi_epi8(b2, b3);
  f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(w01l, w23l));
  f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(w01l, w23l));
  f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(w01h, w23h));
  f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(w01h, w23h));
}

// Partial sums in nf4_values' lane order (a[q]: rows q and q + 4, four lanes each) summed per row:
// rows 0..7 in order (hadd adds adjacent lanes within each 128-bit lane).
inline __m256 nf4_rows(const __m256 a[4]) {
  return _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
}

// nf4 at M = 1, tiles t and t + 1 (t even) group by group, as pair_direct: four partial sums, one per
// lane order of nf4_values. The two tiles side by side in the inner loop and eight partial sums both
// measured slower (benchmarks/README.md, "Exact nf4 decode: byte-plane lookups"): with the four
// byte tables they need more registers than AVX2 has.
inline void nf4_row_pair(const Packed& P, const FloatActs& a, int64_t t, float* y, const NF4Bytes& T) {
  const int64_t bpg = P.group_size / kBlockK;
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, part[4];
  for (int64_t g = 0; g < P.G; ++g) {
    for (int h = 0; h < 2; ++h) {
      for (int q = 0; q < 4; ++q) part[q] = _mm256_setzero_ps();
      const uint8_t* blk = P.block(t + h, g * bpg);
      for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b, blk += P.block_step) {
        if (h == 0) prefetch_pair_ahead(P, blk, kPrefetchBytes);
        const float* x = a.x + b * kBlockK;
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * s));
          __m256 f[4];
          const __m256 x0 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + 8 * s));
          nf4_values<0>(v, T, f);
          for (int q = 0; q < 4; ++q) part[q] = _mm256_fmadd_ps(f[q], x0, part[q]);
          const __m256 x1 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + 8 * s + 4));
          nf4_values<1>(v, T, f);
          for (int q = 0; q < 4; ++q) part[q] = _mm256_fmadd_ps(f[q], x1, part[q]);
        }
      }
      __m256 s, z;
      group_params<quant::kFmtNF4>(P, t + h, g, s, z);
      acc[h] = _mm256_fmadd_ps(s, nf4_rows(part), acc[h]);
    }
  }
  store_rows(P, a, y, 0, t, acc[0]);
  store_rows(P, a, y, 0, t + 1, acc[1]);
}

// sums[i][q] += one block's values (vals, as nf4_tile_buffered stores them) times MB rows of x, in
// nf4_values' lane order.
template <int MB>
inline void nf4_fma_rows(const float* vals, const float* const* x, __m256 (*sums)[4]) {
  __m256 acc[MB][4];
  for (int i = 0; i < MB; ++i) {
    for (int q = 0; q < 4; ++q) acc[i][q] = sums[i][q];
  }
#pragma GCC unroll 8
  for (int st = 0; st < 8; ++st) {  // k = 4 st .. 4 st + 3
    __m256 f[4];
    for (int q = 0; q < 4; ++q) f[q] = _mm256_load_ps(vals + 32 * st + 8 * q);
    for (int i = 0; i < MB; ++i) {
      const __m256 xb = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x[i] + 4 * st));
      for (int q = 0; q < 4; ++q) acc[i][q] = _mm256_fmadd_ps(f[q], xb, acc[i][q]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    for (int q = 0; q < 4; ++q) sums[i][q] = acc[i][q];
  }
}

// nf4 at 2 <= M <= 16: each block's values computed once into an L1 buffer (32 vectors: step
// st = 2s + h, then nf4_values' f[0..3]), then multiplied with the rows two at a time; the partial
// sums of each row, in nf4_values' lane order, run over the group's blocks.
inline void nf4_tile_buffered(const Packed& P, const FloatActs& a, int64_t M, int64_t t, float* y, const NF4Bytes& T) {
  const int64_t bpg = P.group_size / kBlockK;
  alignas(32) float vals[kBlockK * kTileN];
  __m256 sums[quant::kDecodeMaxM][4];
  __m256 acc[quant::kDecodeMaxM];
  for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  const uint8_t* blk = P.block(t, 0);
  for (int64_t g = 0; g < P.G; ++g) {
    for (int64_t m = 0; m < M; ++m) {
      for (int q = 0; q < 4; ++q) sums[m][q] = _mm256_setzero_ps();
    }
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b, blk += P.block_step) {
      prefetch_tile_ahead(P, t, blk, kPrefetchBytes);
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * s));
        __m256 f[4];
        nf4_values<0>(v, T, f);
        for (int q = 0; q < 4; ++q) _mm256_store_ps(vals + 32 * (2 * s) + 8 * q, f[q]);
        nf4_values<1>(v, T, f);
        for (int q = 0; q < 4; ++q) _mm256_store_ps(vals + 32 * (2 * s + 1) + 8 * q, f[q]);
      }
      for (int64_t m0 = 0; m0 < M; m0 += 2) {
        const float* x[2] = {a.x + m0 * P.K + b * kBlockK, a.x + std::min<int64_t>(m0 + 1, M - 1) * P.K + b * kBlockK};
        if (m0 + 1 < M) {
          nf4_fma_rows<2>(vals, x, sums + m0);
        } else {
          nf4_fma_rows<1>(vals, x, sums + m0);
        }
      }
    }
    __m256 s, z;
    group_params<quant::kFmtNF4>(P, t, g, s, z);
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(s, nf4_rows(sums[m]), acc[m]);
  }
  for (int64_t m = 0; m < M; ++m) store_rows(P, a, y, m, t, acc[m]);
}

// The AVX-512 pair kernels (CPUs with AVX-512F): a tile pair's two tiles in the two halves of one
// 512-bit register, each lane running the FMAs of the matching AVX2 kernel in its order.
// (GCC 12's AVX-512 cast and extract intrinsics start from an undefined vector, which -Wall reports
// as maybe-uninitialized: a false positive.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// The 32 bytes at off of a tile pair's two blocks (b0: tile t's, b1: tile t + 1's) in one 512-bit
// register, tile t's in the low half (the AVX-512 pair kernels of every format share it).
__attribute__((target("avx2,fma,f16c,avx512f"))) inline __m512i load_pair(const uint8_t* b0, const uint8_t* b1,
                                                                          int64_t off) {
  return _mm512_inserti64x4(_mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + off))),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b1 + off)), 1);
}

// The values of one block pair for the AVX-512 pair kernels (b0: tile t's block, b1: tile t + 1's),
// k = 0..31 in order, handed to sink(k, v): v's low half the 8 rows of tile t at k, its high half
// those of tile t + 1. int4: the pair's words masked in place, as block_values reads one tile's
// (code · 2^int4_x_shift(j) read as a float's bits); nf4: the 16-entry table (one register) looked up
// by vpermps (permutexvar), which reads only the low 4 bits of each index lane, so the word shifted
// to put code j at bit 0 is its own index, no mask: one shift, one permute per 16 values; int3: both
// tiles' code bytes (block_codes) masked in place, as block_values reads them. The values are those
// of the AVX2 kernels exactly.
template <int FMT, class Sink>
__attribute__((target("avx2,fma,f16c,avx512f"))) inline void pair_values(const uint8_t* b0, const uint8_t* b1,
                                                                         __m512 table, Sink&& sink) {
  if constexpr (FMT == quant::kFmtInt3) {
    __m256i c0[8], c1[8];
    block_codes<quant::kFmtInt3>(b0, c0);
    block_codes<quant::kFmtInt3>(b1, c1);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const __m512i c = _mm512_inserti64x4(_mm512_zextsi256_si512(c0[i]), c1[i], 1);
#pragma GCC unroll 4
      for (int kk = 0; kk < 4; ++kk) {  // as block_values
        const __m512i v = kk == 3 ? _mm512_srli_epi32(c, 24) : _mm512_and_si512(c, _mm512_set1_epi32(0xFF << (8 * kk)));
        sink(4 * i + kk, _mm512_castsi512_ps(v));
      }
    }
  } else {
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      __m512i v = load_pair(b0, b1, 32 * s);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        if constexpr (FMT == quant::kFmtInt4) {
          if (j == 3) v = _mm512_srli_epi32(v, 4);  // as block_values
          const __m512i c =
              j == 7 ? _mm512_srli_epi32(v, 24) : _mm512_and_si512(v, _mm512_set1_epi32(15 << int4_x_shift(j)));
          sink(8 * s + j, _mm512_castsi512_ps(c));
        } else {
          const int sh = 8 * (j & 3) + 4 * (j >> 2);  // code j's bit offset in its word (code4)
          sink(8 * s + j, _mm512_permutexvar_ps(sh == 0 ? v : _mm512_srli_epi32(v, sh), table));
        }
      }
    }
  }
}

// int4 / int3 / nf4 at M = 1 on CPUs with AVX-512F: the tile pair of tile_pair_int4 / tile_pair_int3 /
// nf4_row_pair in one
// 512-bit register (the two tiles' values from pair_values), so one broadcast and one FMA serve
// both tiles' 16 rows, half the instructions of the AVX2 pair. Every lane runs the AVX2 pair's FMAs
// in its order (four partial sums by k mod 4, added pairwise, then the group's scale and zero point
// per tile), so the results are bit-identical to it.
template <int FMT>
__attribute__((target("avx2,fma,f16c,avx512f"))) inline void tile_pair_avx512(const Packed& P, const FloatActs& a,
                                                                              int64_t t, float* y) {
  constexpr int NA = 4;
  const int64_t bpg = P.group_size / kBlockK;
  const int64_t step = FMT == quant::kFmtInt4 ? kInt4BlockStep : P.block_step;
  const __m512 table = _mm512_loadu_ps(kNF4);
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  __m512 p[NA];
  const uint8_t* b0 = P.block(t, 0);
  const uint8_t* b1 = P.block(t + 1, 0);
  for (int64_t g = 0; g < P.G; ++g) {
    for (int i = 0; i < NA; ++i) p[i] = _mm512_setzero_ps();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b, b0 += step, b1 += step) {
      prefetch_ahead(b0, kPairPrefetchBytes);
      prefetch_ahead(b1, kPairPrefetchBytes);
      const float* x = a.x + b * kBlockK;
      pair_values<FMT>(b0, b1, table,
                       [&](int k, __m512 v) { p[k % NA] = _mm512_fmadd_ps(v, _mm512_set1_ps(x[k]), p[k % NA]); });
    }
    alignas(64) float d[2 * kTileN];
    _mm512_store_ps(d, _mm512_add_ps(_mm512_add_ps(p[0], p[1]), _mm512_add_ps(p[2], p[3])));
    for (int h = 0; h < 2; ++h) {
      __m256 sc, z;
      group_params<FMT>(P, t + h, g, sc, z);
      acc[h] = group_combine<FMT>(acc[h], _mm256_load_ps(d + h * kTileN), sc, z,
                                  FMT == quant::kFmtNF4 ? 0.0f : a.xsum[g]);
    }
  }
  store_rows(P, a, y, 0, t, acc[0]);
  store_rows(P, a, y, 0, t + 1, acc[1]);
}

// pair_direct (M <= 4 rows) on CPUs with AVX-512F: the two tiles' 16 rows in one 512-bit register
// (pair_values), so each value vector serves both tiles with one FMA per row where pair_direct spends
// two. Every lane runs pair_direct's FMAs in its order (the same partial sums, added the same way,
// then the group's scale and zero point), so the results are bit-identical to it.
template <int FMT, int MB>
__attribute__((target("avx2,fma,f16c,avx512f"))) void pair_direct_avx512(const Packed& P, const FloatActs& a,
                                                                         int64_t m0, int64_t t, float* y) {
  constexpr int NA = MB == 1 ? 6 : MB == 2 ? 4 : 2;  // as pair_direct
  const int64_t bpg = P.group_size / kBlockK;
  __m256 acc[2][MB];
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < MB; ++i) acc[h][i] = _mm256_setzero_ps();
  }
  __m512 p[MB][NA];
  const __m512 table = _mm512_setzero_ps();  // (int4 / int3: no table)
  const uint8_t* b0 = P.block(t, 0);
  for (int64_t g = 0; g < P.G; ++g) {
    for (int i = 0; i < MB; ++i) {
      for (int n = 0; n < NA; ++n) p[i][n] = _mm512_setzero_ps();
    }
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b, b0 += P.block_step) {
      prefetch_pair_ahead(P, b0, kPrefetchBytes);
      const uint8_t* b1 = b0 + P.block_bytes;  // the pair's blocks alternate (quant_linear_common.h)
      const float* x[MB];
      for (int i = 0; i < MB; ++i) x[i] = a.x + (m0 + i) * P.K + b * kBlockK;
      pair_values<FMT>(b0, b1, table, [&](int k, __m512 v) {
        for (int i = 0; i < MB; ++i) p[i][k % NA] = _mm512_fmadd_ps(v, _mm512_set1_ps(x[i][k]), p[i][k % NA]);
      });
    }
    alignas(64) float d[MB][2 * kTileN];
    for (int i = 0; i < MB; ++i) {
      __m512 sum = p[i][0];
      for (int n = 1; n < NA; ++n) sum = _mm512_add_ps(sum, p[i][n]);  // as FmaSink::sum
      _mm512_store_ps(d[i], sum);
    }
    for (int h = 0; h < 2; ++h) {
      __m256 sc, z;
      group_params<FMT>(P, t + h, g, sc, z);
      for (int i = 0; i < MB; ++i) {
        acc[h][i] = group_combine<FMT>(acc[h][i], _mm256_load_ps(d[i] + h * kTileN), sc, z, a.xsum[(m0 + i) * P.G + g]);
      }
    }
  }
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < MB; ++i) store_rows(P, a, y, m0 + i, t + h, acc[h][i]);
  }
}

// gacc[i] (16 rows of a tile pair) += Σ_k vals[k] · x_i[k] over one block, for MB rows: both tiles
// at once, two partial sums by k mod 2 per row.
template <int MB>
__attribute__((target("avx2,fma,f16c,avx512f"))) inline void fma_rows_pair(const float* vals, const float* const* x,
                                                                          float* gacc) {
  __m512 acc[MB][2];
  for (int i = 0; i < MB; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
#pragma GCC unroll 32
  for (int k = 0; k < kBlockK; ++k) {
    const __m512 v = _mm512_load_ps(vals + 2 * kTileN * k);
    for (int i = 0; i < MB; ++i) acc[i][k % 2] = _mm512_fmadd_ps(v, _mm512_set1_ps(x[i][k]), acc[i][k % 2]);
  }
  for (int i = 0; i < MB; ++i) {
    float* g = gacc + 2 * kTileN * i;
    _mm512_store_ps(g, _mm512_add_ps(_mm512_load_ps(g), _mm512_add_ps(acc[i][0], acc[i][1])));
  }
}

// nf4 at 2 <= M <= 16 on CPUs with AVX-512F, tiles t and t + 1 at once: each block pair's values
// (pair_values: the table permute) stored k-major for both tiles' 16 rows, then multiplied with the
// rows 4 at a time, one 512-bit FMA per value vector and row. The AVX2 nf4 kernel
// (nf4_tile_buffered) sums in the lane order of its byte lookups: the two agree within fp32 rounding.
template <int FMT>
__attribute__((target("avx2,fma,f16c,avx512f"))) void pair_buffered_avx512(const Packed& P, const FloatActs& a,
                                                                           int64_t M, int64_t t, float* y) {
  const int64_t bpg = P.group_size / kBlockK;
  alignas(64) float vals[kBlockK * 2 * kTileN];
  alignas(64) float gacc[quant::kDecodeMaxM * 2 * kTileN];
  __m256 acc[2][quant::kDecodeMaxM];
  for (int64_t m = 0; m < M; ++m) acc[0][m] = acc[1][m] = _mm256_setzero_ps();
  const __m512 table = _mm512_loadu_ps(kNF4);
  const uint8_t* b0 = P.block(t, 0);
  for (int64_t g = 0; g < P.G; ++g) {
    std::fill(gacc, gacc + M * 2 * kTileN, 0.0f);
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b, b0 += P.block_step) {
      prefetch_pair_ahead(P, b0, kPrefetchBytes);
      const uint8_t* b1 = b0 + P.block_bytes;  // the pair's blocks alternate (quant_linear_common.h)
      pair_values<FMT>(b0, b1, table, [&](int k, __m512 v) { _mm512_store_ps(vals + 2 * kTileN * k, v); });
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const float* x[4];
        for (int i = 0; i < 4; ++i) x[i] = a.x + std::min<int64_t>(m0 + i, M - 1) * P.K + b * kBlockK;
        switch (std::min<int64_t>(4, M - m0)) {
          case 1: fma_rows_pair<1>(vals, x, gacc + m0 * 2 * kTileN); break;
          case 2: fma_rows_pair<2>(vals, x, gacc + m0 * 2 * kTileN); break;
          case 3: fma_rows_pair<3>(vals, x, gacc + m0 * 2 * kTileN); break;
          default: fma_rows_pair<4>(vals, x, gacc + m0 * 2 * kTileN); break;
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      __m256 sc, z;
      group_params<FMT>(P, t + h, g, sc, z);
      for (int64_t m = 0; m < M; ++m) {
        const __m256 d = _mm256_load_ps(gacc + (2 * m + h) * kTileN);
        acc[h][m] = group_combine<FMT>(acc[h][m], d, sc, z, FMT == quant::kFmtNF4 ? 0.0f : a.xsum[m * P.G + g]);
      }
    }
  }
  for (int h = 0; h < 2; ++h) {
    for (int64_t m = 0; m < M; ++m) store_rows(P, a, y, m, t + h, acc[h][m]);
  }
}
#pragma GCC diagnostic pop

// nf4, tiles [t0, t1) (whole pairs). At M = 1 a pair at a time (memory-bound: one read stream); above,
// a tile at a time (bound by the arithmetic; a pair version of the buffered kernel measured ~4% slower
// on AVX2); on AVX-512 a pair at a time at every M (tile_pair_avx512, pair_buffered_avx512).
inline void tiles_nf4(const Packed& P, const FloatActs& a, int64_t M, int64_t t0, int64_t t1, float* y) {
  const NF4Bytes T;
  const bool pairs = M == 1 || use_avx512();
  for (int64_t t = t0; t < t1; t += pairs ? 2 : 1) {
    if (M == 1 && use_avx512()) {
      tile_pair_avx512<quant::kFmtNF4>(P, a, t, y);
    } else if (use_avx512()) {
      pair_buffered_avx512<quant::kFmtNF4>(P, a, M, t, y);
    } else if (M == 1) {
      nf4_row_pair(P, a, t, y, T);
    } else {
      nf4_tile_buffered(P, a, M, t, y, T);
    }
  }
}

// int4 / int3, tiles [t0, t1) (whole pairs), a pair at a time (one read stream): the values straight
// from registers, up to 4 rows per pass over the pair's span (direct_chunk), on AVX-512 both tiles in
// one 512-bit register (pair_direct_avx512, bit-identical to pair_direct). At one row the
// side-by-side pair kernels (tile_pair_int4, tile_pair_int3; on AVX-512 tile_pair_avx512, again
// bit-identical).
template <int FMT>
void tiles_fmt(const Packed& P, const FloatActs& a, int64_t M, int64_t t0, int64_t t1, float* y) {
  if (M == 1) {
    for (; t0 < t1; t0 += 2) {
      if (use_avx512()) {
        tile_pair_avx512<FMT>(P, a, t0, y);
      } else if constexpr (FMT == quant::kFmtInt4) {
        tile_pair_int4(P, a, t0, y);
      } else {
        tile_pair_int3(P, a, t0, y);
      }
    }
    return;
  }
  if (use_avx512()) {
    for (; t0 < t1; t0 += 2) {
      for (int64_t m0 = 0; m0 < M;) {
        const int c = direct_chunk(M - m0);
        switch (c) {
          case 1: pair_direct_avx512<FMT, 1>(P, a, m0, t0, y); break;
          case 2: pair_direct_avx512<FMT, 2>(P, a, m0, t0, y); break;
          case 3: pair_direct_avx512<FMT, 3>(P, a, m0, t0, y); break;
          default: pair_direct_avx512<FMT, 4>(P, a, m0, t0, y); break;
        }
        m0 += c;
      }
    }
    return;
  }
  for (int64_t t = t0; t < t1; t += 2) {
    for (int64_t m0 = 0; m0 < M;) {
      const int c = direct_chunk(M - m0);
      switch (c) {
        case 1: pair_direct<FMT, 1>(P, a, m0, t, y); break;
        case 2: pair_direct<FMT, 2>(P, a, m0, t, y); break;
        case 3: pair_direct<FMT, 3>(P, a, m0, t, y); break;
        default: pair_direct<FMT, 4>(P, a, m0, t, y); break;
      }
      m0 += c;
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

// e with 2^e <= max|x| < 2^(e+1) over a row of K values (K a multiple of 8) read 8 at a time as
// fp32 through load(k); 0 for an all-zero row. False where max|x| is outside [2^-60, 2^100) (an
// infinity included) or a nonzero |x| is below 2^(e - span): the range in which the decode kernels'
// power-of-two scalings of the row stay exact. A NaN is skipped (the kernels carry it through).
template <class Load>
inline bool row_exponent(int64_t K, Load load, int span, int& e) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 amax = _mm256_setzero_ps(), amin = inf;
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 v = _mm256_and_ps(load(k), absmask);
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
  e = 0;
  if (A > 0.0f) {
    if (!(A >= 0x1p-60f && A < 0x1p100f)) return false;
    e = std::ilogb(A);
    if (mn < std::ldexp(1.0f, e - span)) return false;
  }
  return true;
}

// int4 / int3: the activations the kernel multiplies, per row m with T = 126 - e (2^e <= max|x_m| <
// 2^(e+1)): xs[m, k] = x[m, k] · 2^(T - x_shift<FMT>(k & 7)) (as two exact multiplications, each factor a
// normal float), xsum_scaled = xsum · 2^(T - 149), unscale[m] = 2^(149 - T). False, and nothing to
// use, when some row is outside the range where all of this is exact: max|x| not in [2^-60, 2^100)
// (Inf included), or a nonzero |x| below 2^(e - 103), whose products would be subnormal. NaN is
// carried through as it is.
template <int FMT>
inline bool prepare_scaled_acts(const float* x, int64_t M, int64_t K, int64_t group_size, const float* xsum,
                              float* xs, float* xsum_scaled, float* unscale) {
  const int64_t G = K / group_size;
  alignas(32) float f2[8];
  for (int j = 0; j < 8; ++j) f2[j] = std::ldexp(1.0f, 64 - x_shift<FMT>(j));
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    int e = 0;
    if (!row_exponent(K, [&](int64_t k) { return _mm256_loadu_ps(xr + k); }, 103, e)) return false;
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
  if (P.fmt == quant::kFmtNF4) return fdec::tiles_nf4(P, a, M, t0, t1, y);
  if (P.fmt == quant::kFmtInt4) return fdec::tiles_fmt<quant::kFmtInt4>(P, a, M, t0, t1, y);
  fdec::tiles_fmt<quant::kFmtInt3>(P, a, M, t0, t1, y);
}
