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

struct Features {
  bool avx2 = false, avxvnni = false, avx512 = false, avx512bf16 = false;
};

const Features& cpu_features() {
  static const Features f = [] {
    Features r;
#if PYHAPPY_HAVE_AVX2_KERNELS
    r.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    r.avxvnni = r.avx2 && __builtin_cpu_supports("avxvnni");
    r.avx512 = r.avx2 && __builtin_cpu_supports("avx512f");
    r.avx512bf16 = r.avx512 && __builtin_cpu_supports("avx512bf16");
#endif
    return r;
  }();
  return f;
}

SimdLevel parse(const char* name) {
  if (std::strcmp(name, "portable") == 0 || std::strcmp(name, "0") == 0) return SimdLevel::kPortable;
  if (std::strcmp(name, "avx2") == 0) return SimdLevel::kAvx2;
  if (std::strcmp(name, "avxvnni") == 0) return SimdLevel::kAvxVnni;
  if (std::strcmp(name, "avx512") == 0 || std::strcmp(name, "1") == 0) return SimdLevel::kAvx512;
  throw std::invalid_argument(
      std::string("set_simd_level: level must be 'portable', 'avx2', 'avxvnni' or 'avx512', got '") + name + "'");
}

std::atomic<int>& cap() {
  // PYHAPPY_CPU_SIMD=0 (or =portable) forces the portable kernels from the start; =avx2 leaves out
  // AVX-VNNI and AVX-512, =avxvnni leaves out AVX-512.
  static std::atomic<int> c{env_choice("PYHAPPY_CPU_SIMD", static_cast<int>(SimdLevel::kAvx512), parse)};
  return c;
}

bool allowed(SimdLevel l) { return cap().load(std::memory_order_relaxed) >= static_cast<int>(l); }

}  // namespace

bool use_avx2() { return cpu_features().avx2 && allowed(SimdLevel::kAvx2); }
bool use_avxvnni() { return cpu_features().avxvnni && allowed(SimdLevel::kAvxVnni); }
bool use_avx512() { return cpu_features().avx512 && allowed(SimdLevel::kAvx512); }
bool use_avx512bf16() { return cpu_features().avx512bf16 && allowed(SimdLevel::kAvx512); }

SimdLevel simd_level_in_use() {
  if (use_avx512()) return SimdLevel::kAvx512;
  if (use_avxvnni()) return SimdLevel::kAvxVnni;
  return use_avx2() ? SimdLevel::kAvx2 : SimdLevel::kPortable;
}

void set_simd_level(const char* name) { cap().store(static_cast<int>(parse(name))); }

void set_simd_enabled(bool enabled) { set_simd_level(enabled ? "avx512" : "portable"); }

const char* simd_level() {
  static const char* names[] = {"portable", "avx2+fma", "avx2+fma+avxvnni", "avx2+fma+avx512f",
                                "avx2+fma+avxvnni+avx512f", "avx2+fma+avx512f+avx512bf16",
                                "avx2+fma+avxvnni+avx512f+avx512bf16"};
  if (!use_avx2()) return names[0];
  return names[1 + (use_avxvnni() ? 1 : 0) + (use_avx512() ? 2 : 0) + (use_avx512bf16() ? 2 : 0)];
}

}  // namespace cpu
}  // namespace pyhappy
