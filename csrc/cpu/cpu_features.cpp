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
  bool avx2 = false, avxvnni = false, avx512 = false, avx512bf16 = false, avx512vnni = false;
};

const Features& cpu_features() {
  static const Features f = [] {
    Features r;
#if PYHAPPY_HAVE_AVX2_KERNELS
    r.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    r.avxvnni = r.avx2 && __builtin_cpu_supports("avxvnni");
    r.avx512 = r.avx2 && __builtin_cpu_supports("avx512f");
    r.avx512bf16 = r.avx512 && __builtin_cpu_supports("avx512bf16");
    r.avx512vnni = r.avx512 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
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
bool use_avx512vnni() { return cpu_features().avx512vnni && allowed(SimdLevel::kAvx512); }

SimdLevel simd_level_in_use() {
  if (use_avx512()) return SimdLevel::kAvx512;
  if (use_avxvnni()) return SimdLevel::kAvxVnni;
  return use_avx2() ? SimdLevel::kAvx2 : SimdLevel::kPortable;
}

void set_simd_level(const char* name) { cap().store(static_cast<int>(parse(name))); }

void set_simd_enabled(bool enabled) { set_simd_level(enabled ? "avx512" : "portable"); }

const char* simd_level() {
  // One name per combination of the extensions in use, built once (the returned text stays valid).
  static const std::string* names = [] {
    auto* n = new std::string[32];
    for (int i = 0; i < 32; ++i) {
      n[i] = "avx2+fma";
      if (i & 1) n[i] += "+avxvnni";
      if (i & 2) n[i] += "+avx512f";
      if (i & 4) n[i] += "+avx512bf16";
      if (i & 8) n[i] += "+avx512vnni";
    }
    n[16] = "portable";
    return n;
  }();
  if (!use_avx2()) return names[16].c_str();
  return names[(use_avxvnni() ? 1 : 0) | (use_avx512() ? 2 : 0) | (use_avx512bf16() ? 4 : 0) |
               (use_avx512vnni() ? 8 : 0)].c_str();
}

}  // namespace cpu
}  // namespace pyhappy
