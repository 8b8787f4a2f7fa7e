// Counter-based dropout mask shared by every backend (C++ CPU, CUDA; Triton and the pure-PyTorch
// reference spell the same arithmetic). The mask is a pure function of (seed, row, col), so the
// forward never stores it and the backward regenerates it bit for bit.
//
//   a    = mix32(seed + row * 0x9E3779B9)     (uint32 wrap-around)
//   h    = mix32(a ^ col)
//   keep = h >= threshold                     threshold = min(floor(p * 2^32), 2^32 - 1)
//
// mix32 is Chris Wellons' "lowbias32" integer hash. Header-only and __host__ __device__ so the
// CUDA kernels and the CPU kernels run the very same code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PYHAPPY_HD __host__ __device__ __forceinline__
#else
#define PYHAPPY_HD inline
#endif

namespace pyhappy {

PYHAPPY_HD uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7feb352du;
  h ^= h >> 15;
  h *= 0x846ca68bu;
  h ^= h >> 16;
  return h;
}

PYHAPPY_HD uint32_t dropout_row_key(uint32_t seed, uint32_t row) {
  return mix32(seed + row * 0x9E3779B9u);
}

PYHAPPY_HD bool dropout_keep(uint32_t row_key, uint32_t col, uint32_t threshold) {
  return mix32(row_key ^ col) >= threshold;
}

PYHAPPY_HD uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

}  // namespace pyhappy
