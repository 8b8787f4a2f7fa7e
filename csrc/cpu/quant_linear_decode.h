// The int8-activation SIMD decode kernel of pyhappy::quant_linear (M <= 16 rows of x; only with
// int8_decode=True, an approximate opt-in: the default is quant_linear_decode_float.h): one pass over
// the packed weight, integer dot products of its codes with the activations quantized to int8 per
// 32-element block, the 8 rows of a tile in the 8 int32 lanes of one register.
//
// csrc/cpu/quant_linear.cpp includes this file twice, each time inside a `#pragma GCC target`
// region and its own namespace that defines `constexpr bool kVnni`:
//   * avx2  (target avx2,fma,f16c):         maddubs + madd dot products;
//   * vnni  (target avx2,fma,f16c,avxvnni): vpdpbusd, one instruction per 32 code bytes instead of
//     two or three, and 4-bit high nibbles enter as 16·code (masked, not shifted; the sum is shifted
//     back exactly once per block).
// The enclosing file provides Packed, QuantActs, kNF4u8, kNF4Zero, kNF4Steps, kTileN and kBlockK
// (and cpu/simd_load.h's load8_as_float).
// Both variants compute bit-identical results (exact integer dot products, the same float ops in the
// same order), and the same as gemv_tiles_portable.

// ---- activations ------------------------------------------------------------------------------

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline int32_t hsum8_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// quantize_acts (csrc/cpu/quant_linear.cpp) with the same float operations: the block's max|x|,
// d = max/127, codes = round-to-nearest-even(x · (127/max)) (cvtps under the default rounding mode is
// std::nearbyint), clamped to ±127; a NaN or Inf in the block makes d NaN and its codes 0.
template <typename T>
void quantize_acts_simd(const T* x, int64_t M, int64_t K, int64_t group_size, QuantActs& a) {
  const int64_t KB = K / kBlockK, bpg = group_size / kBlockK, G = K / group_size;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 fmax = _mm256_set1_ps(std::numeric_limits<float>::max());
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < KB; ++b) {
      const T* xb = x + m * K + b * kBlockK;
      __m256 v[4];
      __m256 amax = _mm256_setzero_ps();
      __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
      for (int i = 0; i < 4; ++i) {
        v[i] = load8_as_float(xb + 8 * i);
        const __m256 av = _mm256_and_ps(v[i], absmask);
        ok = _mm256_and_ps(ok, _mm256_cmp_ps(av, fmax, _CMP_LE_OQ));  // false for NaN and Inf
        amax = _mm256_max_ps(amax, av);
      }
      const bool finite = _mm256_movemask_ps(ok) == 0xFF;
      const float am = finite ? hmax8(amax) : 0.0f;
      const float d = finite ? am / 127.0f : std::numeric_limits<float>::quiet_NaN();
      const float inv = finite && am > 0.0f ? 127.0f / am : 0.0f;
      const __m256 vinv = _mm256_set1_ps(inv);
      __m256i q[4];
      for (int i = 0; i < 4; ++i) {
        q[i] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[i], vinv)), lo), hi);
      }
      const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q.data() + m * K + b * kBlockK),
                          _mm256_permutevar8x32_epi32(p, order));
      a.d[m * KB + b] = d;
      a.zterm[m * G + b / bpg] += d * static_cast<float>(hsum8_epi32(sum));
    }
  }
}

// ---- weights ----------------------------------------------------------------------------------

// The code vectors of one block: c[j] byte 4r + kk = code(r, k = 4j + kk), rows 0..3 in the low
// 128-bit lane and 4..7 in the high one; NF4 codes already mapped through the byte table; with
// kVnni, 4-bit high nibbles (odd j) hold 16·code.
template <int FMT>
inline void block_codes(const uint8_t* blk, __m256i c[8]) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  if constexpr (FMT == quant::kFmtInt3) {
    // Code i = bits 3i .. 3i+2 of v0 | v1 << 8 | v2 << 16 (per byte): one shift and mask, except
    // i = 2 and 5, which straddle two vectors. 16-bit shifts carry a neighbour byte's bits in; the
    // masks drop them.
    const __m256i m07 = _mm256_set1_epi8(0x07), m03 = _mm256_set1_epi8(0x03), m01 = _mm256_set1_epi8(0x01);
    const __m256i m04 = _mm256_set1_epi8(0x04), m06 = _mm256_set1_epi8(0x06);
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32));
    const __m256i v2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64));
    c[0] = _mm256_and_si256(v0, m07);
    c[1] = _mm256_and_si256(_mm256_srli_epi16(v0, 3), m07);
    c[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v0, 6), m03), _mm256_and_si256(_mm256_slli_epi16(v1, 2), m04));
    c[3] = _mm256_and_si256(_mm256_srli_epi16(v1, 1), m07);
    c[4] = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m07);
    c[5] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v1, 7), m01), _mm256_and_si256(_mm256_slli_epi16(v2, 1), m06));
    c[6] = _mm256_and_si256(_mm256_srli_epi16(v2, 2), m07);
    c[7] = _mm256_and_si256(_mm256_srli_epi16(v2, 5), m07);
  } else {
    for (int s = 0; s < 4; ++s) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * s));
      c[2 * s] = _mm256_and_si256(v, m4);
      if constexpr (kVnni && FMT == quant::kFmtInt4) {
        c[2 * s + 1] = _mm256_and_si256(v, _mm256_set1_epi8(static_cast<char>(0xF0)));
      } else {
        c[2 * s + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      }
    }
    if constexpr (FMT == quant::kFmtNF4) {
      const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kNF4u8.v)));
      for (int j = 0; j < 8; ++j) c[j] = _mm256_shuffle_epi8(lut, c[j]);
    }
  }
}

// The 4 bytes at p as one int32 (a dword of 4 activation bytes, for a broadcast).
inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline __m256i bcast4(const int8_t* p) { return _mm256_set1_epi32(load4(p)); }

// Σ_k code(r, k) · xq[k] over one block, row r in int32 lane r.
template <int FMT>
inline __m256i block_dot(const __m256i c[8], const int8_t* xq) {
  if constexpr (kVnni) {
    __m256i even = _mm256_setzero_si256(), odd = _mm256_setzero_si256();
    for (int j = 0; j < 8; j += 2) {
      even = _mm256_dpbusd_avx_epi32(even, c[j], bcast4(xq + 4 * j));
      odd = _mm256_dpbusd_avx_epi32(odd, c[j + 1], bcast4(xq + 4 * j + 4));
    }
    if constexpr (FMT == quant::kFmtInt4) odd = _mm256_srai_epi32(odd, 4);  // exact: a sum of 16·code·x
    return _mm256_add_epi32(even, odd);
  } else {
    const __m256i ones = _mm256_set1_epi16(1);
    if constexpr (FMT == quant::kFmtNF4) {  // table bytes <= 127: pair sums up to 2·127·127, widen every step
      __m256i s32 = _mm256_setzero_si256();
      for (int j = 0; j < 8; ++j) {
        s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(_mm256_maddubs_epi16(c[j], bcast4(xq + 4 * j)), ones));
      }
      return s32;
    } else {  // codes < 16: pair sums <= 2·15·127, eight of them fit int16
      __m256i s16 = _mm256_setzero_si256();
      for (int j = 0; j < 8; ++j) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(c[j], bcast4(xq + 4 * j)));
      return _mm256_madd_epi16(s16, ones);
    }
  }
}

constexpr int64_t kPrefetchBytes = 2048;
// The streaming decode loops also fetch their stream this far ahead into L2 (prefetcht1): with only
// the L1 prefetch a few KiB ahead, the lines in flight per core were too few to cover the memory's
// latency on a loaded machine, and the loops read well below a streaming sum's bandwidth
// (benchmarks/README.md, "Design measurements", "Decode prefetch into L2").
constexpr int64_t kL2PrefetchBytes = 32768;

// Software prefetch of the tile pair's block ``ahead`` bytes on into L1 and kL2PrefetchBytes on into
// L2, all of its lines (the hardware prefetcher alone leaves part of the read bandwidth unused:
// benchmarks/README.md, "Design measurements", "Decode prefetch"). ``blk``: the block of the pair's
// first tile (the pair's block starts there). Prefetches past the end of the weight are harmless
// (they never fault).
inline void prefetch_pair_ahead(const Packed& P, const uint8_t* blk, int64_t ahead) {
  const char* p = reinterpret_cast<const char*>(blk + ahead);
  const char* p2 = reinterpret_cast<const char*>(blk + kL2PrefetchBytes);
  for (int64_t o = 0; o < P.block_step; o += 64) {
    _mm_prefetch(p + o, _MM_HINT_T0);
    _mm_prefetch(p2 + o, _MM_HINT_T1);
  }
  _mm_prefetch(p + P.block_step - 1, _MM_HINT_T0);  // 3-bit: a 192-byte block can span four lines
  _mm_prefetch(p2 + P.block_step - 1, _MM_HINT_T1);
}

// The one-tile kernels' software prefetch for block ``blk`` of tile t (nf4's buffered kernel of
// several rows on AVX2, bound by its arithmetic: it takes tile 2p, then 2p + 1). Each pass fetches the bytes of the pass
// after it into L2 while it reads its own, so the weight streams from memory at an even rate: the
// pass of tile 2p the same block of tile 2p + 1, ``ahead`` bytes on; the pass of tile 2p + 1 the same
// block of the next pair's first tile (a whole pass ahead). Each also fetches its own block
// ``ahead`` bytes on into L1 (from L2, or from memory for a thread's first tile).
inline void prefetch_tile_ahead(const Packed& P, int64_t t, const uint8_t* blk, int64_t ahead) {
  const char* own = reinterpret_cast<const char*>(blk + ahead);
  _mm_prefetch(own, _MM_HINT_T0);
  _mm_prefetch(own + 64, _MM_HINT_T0);
  const char* next = (t & 1) ? reinterpret_cast<const char*>(blk - P.block_bytes + P.KB * P.block_step)
                             : own + P.block_bytes;
  _mm_prefetch(next, _MM_HINT_T1);
  _mm_prefetch(next + P.block_bytes - 1, _MM_HINT_T1);
}

// Rows [n0, n0 + 8) of y's row m from one tile's accumulator (fewer at the end of N, none for a
// tile of padding rows).
inline void store_tile_rows(const Packed& P, float* y, int64_t m, int64_t t, __m256 v) {
  const int64_t n0 = t * kTileN, rows = std::min<int64_t>(kTileN, P.N - n0);
  if (rows <= 0) return;
  float* yr = y + m * P.N + n0;
  if (rows == kTileN) {
    _mm256_storeu_ps(yr, v);
  } else {
    alignas(32) float tmp[kTileN];
    _mm256_store_ps(tmp, v);
    std::memcpy(yr, tmp, rows * sizeof(float));
  }
}

// y[m0 .. m0 + MB, rows of tiles t and t + 1] (t even): group by group, the group's blocks of tile t
// and then of tile t + 1, so the pair's interleaved blocks (csrc/quant_linear_common.h) are read as
// one stream, each group's span of it once.
template <int FMT, int MB>
void decode_pair(const Packed& P, const QuantActs& a, int64_t m0, int64_t t, float* y) {
  const int64_t bpg = P.group_size / kBlockK;
  __m256 acc[2][MB];
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < MB; ++i) acc[h][i] = _mm256_setzero_ps();
  }
  for (int64_t g = 0; g < P.G; ++g) {
    for (int h = 0; h < 2; ++h) {
      __m256 gacc[MB];
      for (int i = 0; i < MB; ++i) gacc[i] = _mm256_setzero_ps();
      const uint8_t* blk = P.block(t + h, g * bpg);
      for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b, blk += P.block_step) {
        if (h == 0) prefetch_pair_ahead(P, blk, kPrefetchBytes);
        __m256i c[8];
        block_codes<FMT>(blk, c);
        for (int i = 0; i < MB; ++i) {
          const __m256i dot = block_dot<FMT>(c, a.q.data() + (m0 + i) * P.K + b * kBlockK);
          gacc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(a.d[(m0 + i) * P.KB + b]), gacc[i]);
        }
      }
      const int64_t pi = quant::param_index(t + h, P.G, g, 0);
      __m256 s, z;
      if constexpr (FMT == quant::kFmtNF4) {
        s = _mm256_mul_ps(_mm256_loadu_ps(static_cast<const float*>(P.scales) + pi), _mm256_set1_ps(1.0f / kNF4Steps));
        z = _mm256_set1_ps(static_cast<float>(kNF4Zero));
      } else {
        s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const at::Half*>(P.scales) + pi)));
        z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(P.zeros + pi))));
      }
      for (int i = 0; i < MB; ++i) {
        const __m256 v = _mm256_fnmadd_ps(z, _mm256_set1_ps(a.zterm[(m0 + i) * P.G + g]), gacc[i]);
        acc[h][i] = _mm256_fmadd_ps(s, v, acc[h][i]);
      }
    }
  }
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < MB; ++i) store_tile_rows(P, y, m0 + i, t + h, acc[h][i]);
  }
}

constexpr int kMaxMB = 4;  // activation rows sharing one pass over a tile's codes
using TileFn = void (*)(const Packed&, const QuantActs&, int64_t, int64_t, float*);

template <int FMT>
TileFn tile_fn(int mb) {
  switch (mb) {
    case 1: return &decode_pair<FMT, 1>;
    case 2: return &decode_pair<FMT, 2>;
    case 3: return &decode_pair<FMT, 3>;
    default: return &decode_pair<FMT, 4>;
  }
}

TileFn tile_fn(int fmt, int mb) {
  return fmt == quant::kFmtNF4 ? tile_fn<quant::kFmtNF4>(mb)
         : fmt == quant::kFmtInt4 ? tile_fn<quant::kFmtInt4>(mb)
                                  : tile_fn<quant::kFmtInt3>(mb);
}

// y[m, n] for tiles [t0, t1) (whole pairs: t0 and t1 even), all m < M.
inline void decode_tiles(const Packed& P, const QuantActs& a, int64_t M, int64_t t0, int64_t t1, float* y) {
  const TileFn full = tile_fn(P.fmt, kMaxMB), rest = tile_fn(P.fmt, static_cast<int>(M % kMaxMB));
  for (int64_t t = t0; t < t1; t += 2) {
    int64_t m0 = 0;
    for (; m0 + kMaxMB <= M; m0 += kMaxMB) full(P, a, m0, t, y);
    if (m0 < M) rest(P, a, m0, t, y);
  }
}
