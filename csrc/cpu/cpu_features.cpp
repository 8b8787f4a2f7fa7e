#include "cpu/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace pyhappy {
namespace cpu {
namespace {

bool cpu_has_avx2() {
#if PYHAPPY_HAVE_AVX2_KERNELS
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

std::atomic<bool>& simd_enabled() {
  // PYHAPPY_CPU_SIMD=0 forces the portable kernels from the start.
  static std::atomic<bool> enabled{[] {
    const char* v = std::getenv("PYHAPPY_CPU_SIMD");
    return !(v && std::strcmp(v, "0") == 0);
  }()};
  return enabled;
}

}  // namespace

bool use_avx2() { return cpu_has_avx2() && simd_enabled().load(std::memory_order_relaxed); }

void set_simd_enabled(bool enabled) { simd_enabled().store(enabled); }

const char* simd_level() { return use_avx2() ? "avx2+fma" : "portable"; }

}  // namespace cpu
}  // namespace pyhappy
