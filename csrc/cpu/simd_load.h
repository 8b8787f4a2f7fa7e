// AVX2 loads of 8 values from float32 or bfloat16 memory as 8 floats, shared by the CPU kernels
// (the quantized decode's activation quantizer, the sparse-delta panel builder).
#pragma once

#include <c10/util/BFloat16.h>

#include "cpu/cpu_features.h"

#if PYHAPPY_HAVE_AVX2_KERNELS
#include <immintrin.h>

namespace pyhappy {
namespace cpu {

PYHAPPY_TARGET_AVX2 inline __m256 load8_as_float(const float* p) { return _mm256_loadu_ps(p); }

// bfloat16 is the high half of a float32: widen to 32 bits and shift into place (exact).
PYHAPPY_TARGET_AVX2 inline __m256 load8_as_float(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

}  // namespace cpu
}  // namespace pyhappy
#endif
