// AVX2 form of the dropout hash of dropout_hash.h: 8 columns of one row per call.
// Include only from translation units that guard on PYHAPPY_HAVE_AVX2_KERNELS.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu/cpu_features.h"
#include "dropout_hash.h"

namespace pyhappy {
namespace cpu {

// Keep mask for columns col..col+7 of the row whose key is row_key (all-ones lane = keep).
PYHAPPY_TARGET_AVX2 inline __m256 dropout_keep8(uint32_t row_key, uint32_t col, uint32_t threshold) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i h = _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(row_key)),
                               _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(col)), lanes));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0x7feb352du)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0x846ca68bu)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  // unsigned h >= t  <=>  !(signed(t ^ 2^31) > signed(h ^ 2^31)); AVX2 has only signed compares.
  const __m256i bias = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i drop = _mm256_cmpgt_epi32(_mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(threshold)), bias),
                                          _mm256_xor_si256(h, bias));
  return _mm256_castsi256_ps(_mm256_xor_si256(drop, _mm256_set1_epi32(-1)));
}

// out[j] = keep(row, col0 + j) ? x[j] * scale : 0 for j < n, unit stride; out may alias x.
PYHAPPY_TARGET_AVX2 inline void dropout_row_f32(const float* x, float* out, int64_t n, uint32_t row_key,
                                                 uint32_t col0, uint32_t threshold, float scale) {
  const __m256 vscale = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 keep = dropout_keep8(row_key, col0 + static_cast<uint32_t>(j), threshold);
    _mm256_storeu_ps(out + j, _mm256_and_ps(_mm256_mul_ps(_mm256_loadu_ps(x + j), vscale), keep));
  }
  for (; j < n; ++j) {
    out[j] = dropout_keep(row_key, col0 + static_cast<uint32_t>(j), threshold) ? x[j] * scale : 0.0f;
  }
}

}  // namespace cpu
}  // namespace pyhappy
