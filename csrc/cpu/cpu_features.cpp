#include "cpu/cpu_features.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace pyhappy {
namespace cpu {
namespace {

SimdLevel cpu_supports() {
#if PYHAPPY_HAVE_AVX2_KERNELS
  static const SimdLevel level = [] {
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return SimdLevel::kPortable;
    return __builtin_cpu_supports("avxvnni") ? SimdLevel::kAvxVnni : SimdLevel::kAvx2;
  }();
  return level;
#else
  return SimdLevel::kPortable;
#endif
}

SimdLevel parse(const char* name) {
  if (std::strcmp(name, "portable") == 0 || std::strcmp(name, "0") == 0) return SimdLevel::kPortable;
  if (std::strcmp(name, "avx2") == 0) return SimdLevel::kAvx2;
  if (std::strcmp(name, "avxvnni") == 0 || std::strcmp(name, "1") == 0) return SimdLevel::kAvxVnni;
  throw std::invalid_argument(std::string("set_simd_level: level must be 'portable', 'avx2' or 'avxvnni', got '") +
                              name + "'");
}

std::atomic<int>& cap() {
  // PYHAPPY_CPU_SIMD=0 (or =portable) forces the portable kernels from the start; =avx2 leaves out AVX-VNNI.
  static std::atomic<int> c{[] {
    const char* v = std::getenv("PYHAPPY_CPU_SIMD");
    if (!v || !*v) return static_cast<int>(SimdLevel::kAvxVnni);
    try {
      return static_cast<int>(parse(v));
    } catch (const std::invalid_argument&) {
      return static_cast<int>(SimdLevel::kAvxVnni);
    }
  }()};
  return c;
}

}  // namespace

SimdLevel simd_level_in_use() {
  const int c = cap().load(std::memory_order_relaxed);
  return static_cast<SimdLevel>(std::min(c, static_cast<int>(cpu_supports())));
}

bool use_avx2() { return simd_level_in_use() >= SimdLevel::kAvx2; }

void set_simd_level(const char* name) { cap().store(static_cast<int>(parse(name))); }

void set_simd_enabled(bool enabled) { set_simd_level(enabled ? "avxvnni" : "portable"); }

const char* simd_level() {
  switch (simd_level_in_use()) {
    case SimdLevel::kAvxVnni: return "avx2+fma+avxvnni";
    case SimdLevel::kAvx2: return "avx2+fma";
    default: return "portable";
  }
}

}  // namespace cpu
}  // namespace pyhappy
