// Runtime CPU-feature dispatch for the C++ CPU kernels. AVX2 code is compiled per function with
// __attribute__((target("avx2,fma"))) so the extension itself runs on any x86-64 (and builds on
// other architectures, where only the portable path exists).
#pragma once

namespace pyhappy {
namespace cpu {

// True when the AVX2+FMA kernels are compiled in, supported by this CPU, and not disabled by
// set_simd_enabled(false) (tests use it to exercise the portable path too).
bool use_avx2();
void set_simd_enabled(bool enabled);
const char* simd_level();

}  // namespace cpu
}  // namespace pyhappy

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PYHAPPY_HAVE_AVX2_KERNELS 1
#define PYHAPPY_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define PYHAPPY_HAVE_AVX2_KERNELS 0
#define PYHAPPY_TARGET_AVX2
#endif
