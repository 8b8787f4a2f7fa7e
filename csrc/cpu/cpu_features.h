// Runtime CPU-feature dispatch for the C++ CPU kernels. SIMD code is compiled per function (or per
// `#pragma GCC target` region) for its instruction set, so the extension itself runs on any x86-64
// (and builds on other architectures, where only the portable path exists).
#pragma once

#include <cstdlib>
#include <stdexcept>

namespace pyhappy {
namespace cpu {

// The setting named by environment variable `var`, as `parse` reads it (parse throws
// std::invalid_argument on a bad value), or `fallback` when the variable is unset, empty or bad.
template <class Parse>
int env_choice(const char* var, int fallback, Parse parse) {
  const char* v = std::getenv(var);
  if (!v || !*v) return fallback;
  try {
    return static_cast<int>(parse(v));
  } catch (const std::invalid_argument&) {
    return fallback;
  }
}

// The kernel levels, in the order of the cap (set_simd_level / PYHAPPY_CPU_SIMD): a cap allows the
// levels at or below it that this CPU supports. kAvxVnni adds AVX-VNNI (vpdpbusd on ymm registers),
// used by the quantized decode kernel; kAvx512 adds AVX-512F (zmm FMAs), used by the low-rank
// adapter's skinny kernels. A CPU may have either of the two without the other (Skylake-SP has
// AVX-512 and no AVX-VNNI, Alder Lake the reverse), so each has its own query below.
enum class SimdLevel { kPortable = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512 = 3 };

// The highest level that is both allowed by the cap and (for kAvx2) supported; use the use_*
// queries for the optional extensions.
SimdLevel simd_level_in_use();
// True when the AVX2+FMA kernels run.
bool use_avx2();
// True when the AVX-VNNI decode kernel runs (the cap allows it and the CPU has AVX-VNNI).
bool use_avxvnni();
// True when the AVX-512F kernels run (the cap allows them and the CPU has AVX-512F).
bool use_avx512();
// True when the AVX512-BF16 kernels run (the cap allows AVX-512 and the CPU has AVX512-BF16): the
// exact int4 / int3 decode of bfloat16 activations (vdpbf16ps).
bool use_avx512bf16();
// True when the AVX512-VNNI kernels run (the cap allows AVX-512 and the CPU has AVX512-VNNI and
// AVX512-BW): the exact integer int4 / int3 decode (vpdpbusd on zmm registers).
bool use_avx512vnni();
// Cap the level: "portable", "avx2", "avxvnni" or "avx512" (the default: no cap).
void set_simd_level(const char* name);
// set_simd_level("portable") for false, no cap for true.
void set_simd_enabled(bool enabled);
// The kernels in use as text: "portable", or "avx2+fma" followed by "+avxvnni" and/or "+avx512f"
// (then "+avx512bf16" and "+avx512vnni" where those are used too).
const char* simd_level();

}  // namespace cpu
}  // namespace pyhappy

// PYHAPPY_PORTABLE_ONLY leaves the x86 kernels out on x86-64 too: .ci/portable compiles the sources
// that way, as a build for another architecture would see them.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(PYHAPPY_PORTABLE_ONLY)
#define PYHAPPY_HAVE_AVX2_KERNELS 1
#define PYHAPPY_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define PYHAPPY_HAVE_AVX2_KERNELS 0
#define PYHAPPY_TARGET_AVX2
#endif
