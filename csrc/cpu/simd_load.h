// AVX2 loads of 8 values from float32, bfloat16 or float16 memory as 8 floats, shared by the CPU kernels
// (the quantized decode's activation quantizer, the sparse-delta panel builder).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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

// float16 through F16C (exact): callable only from code compiled with f16c as well (the quantized
// decode kernels' target).
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8_as_float(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

}  // namespace cpu
}  // namespace pyhappy
#endif
