// Runtime CPU-feature dispatch for the C++ CPU kernels. SIMD code is compiled per function (or per
// `#pragma GCC target` region) for its instruction set, so the extension itself runs on any x86-64
// (and builds on other architectures, where only the portable path exists).
#pragma once

namespace pyhappy {
namespace cpu {

// The kernel levels, each including the ones below it. kAvxVnni adds AVX-VNNI (vpdpbusd on ymm
// registers), used by the quantized decode kernel; everything else tops out at kAvx2.
enum class SimdLevel { kPortable = 0, kAvx2 = 1, kAvxVnni = 2 };

// The best level this CPU supports (and this build compiled), capped by set_simd_level /
// PYHAPPY_CPU_SIMD; tests lower the cap to exercise every path on one machine.
SimdLevel simd_level_in_use();
// True when the AVX2+FMA kernels run (level >= kAvx2).
bool use_avx2();
// Cap the level: "portable", "avx2" or "avxvnni" (the default: the best supported).
void set_simd_level(const char* name);
// set_simd_level("portable") for false, no cap for true.
void set_simd_enabled(bool enabled);
// The level in use as text: "portable", "avx2+fma" or "avx2+fma+avxvnni".
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
