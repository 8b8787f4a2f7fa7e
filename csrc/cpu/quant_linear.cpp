// C++ CPU backend of pyhappy::quant_linear: linear layer on a packed 4/3-bit weight (+ LoRA).
//
//   y = x · deq(Wq)ᵀ + bias + s · ((dropout(x) Aᵀ) Cᵀ) Bᵀ
//
// Packed layout (pyhappy/quant/layout.py): 8-row tiles x 32-k blocks, tiles in pairs whose blocks
// alternate in memory (Packed::block); 4-bit blocks are 128 bytes
// (a 32-byte load = 8 rows x 8 k, low nibbles k = 8s..8s+3, high nibbles 8s+4..8s+7), 3-bit blocks
// 96 bytes (three 32-byte vectors, eight codes in each byte triple); per-group parameters
// [N8, G, 8] (layout: csrc/quant_linear_common.h). fmt: 0 nf4 (float32 absmax), 1 int4, 2 int3 (float16 scales, uint8 zeros).
//
// Two schedules:
//  * decode (M <= kDecodeMaxM): memory-bound at M = 1. Each weight byte is read once for all M rows.
//    By default the kernel is exact (quant_linear_decode_float.h): the codes are turned into fp32
//    in registers (int4 and int3 codes read in place as subnormal floats against
//    activations pre-scaled by powers of two, NF4 codes through the 16-entry table) and multiplied
//    with the activations in fp32 (bf16/fp16 converted once per call) by FMAs, the 8 rows of a
//    tile in the 8 lanes of one register; zero points are applied per group with the
//    activations' per-group sums, y = Σ_g s_g · (Σ_k q_k x_k − z_g Σ_k x_k). Results agree with
//    the dequantize-then-matmul reference within fp32 rounding (AVX2+FMA, else the portable loop).
//    At 1-2 rows of an int4 / int3 weight, int_dot (a candidate of the measured dispatch) asks for
//    the exact integer kernel on AVX512-VNNI CPUs (quant_linear_decode_digits.h): the activations
//    as signed base-256 digits of per-group integers, multiplied with the codes by vpdpbusd.
//    With int8_decode (an explicit opt-in, approximate) the activations are instead quantized to
//    int8 per 32-element block (scale max|x|/127) and multiplied by integer dot products, as
//    llama.cpp does (quant_linear_decode.h: AVX-VNNI vpdpbusd where the CPU has it, else AVX2
//    maddubs/madd, else the portable loop): NF4 codes go through a 16-entry byte table
//    (round(63·NF4) + 64) with pshufb; zero points (and the NF4 offset) are applied per group from
//    precomputed activation block sums. Its error is that of the int8 activations (~-40 dB).
//  * GEMM (larger M): compute-bound. Threads dequantize L3-sized row slabs of W (exactly as the
//    reference does: (q - z)·s or NF4[q]·absmax in float32) into a private buffer and multiply with
//    BLAS into their slice of y; there is never a full-precision [N, K] copy of W. The backward's dx =
//    dy · deq(W) runs the same way over column slabs.
// The LoRA adapter (u, its epilogue, its gradients) is lora_linear's (cpu/lora_adapter.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ScalarOps.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/eager_ops.h"
#include "cpu/gemm.h"
#include "cpu/lora_adapter.h"
#include "cpu/parallel.h"
#include "cpu/simd_load.h"
#include "quant_linear_common.h"

#if PYHAPPY_HAVE_AVX2_KERNELS
#include <immintrin.h>
#define PYHAPPY_TARGET_QUANT __attribute__((target("avx2,fma,f16c")))
#endif

namespace pyhappy {
namespace cpu {
namespace {

constexpr int64_t kTileN = quant::kTileN;
constexpr int64_t kBlockK = quant::kBlockK;
constexpr int64_t kDecodeMaxM = quant::kDecodeMaxM;

constexpr float kNF4[16] = PYHAPPY_NF4_TABLE;

// int8_decode only: NF4 for the integer dot products as unsigned bytes with an offset: round(63 · NF4) + 64, in
// [1, 127], so codes enter maddubs like int4 codes do (pair sums <= 2·127·127, no saturation) and
// the offset is removed per group with the activation block sums, like an int format's zero point.
// The rounding to 1/63 of absmax adds ~-43 dB of error, far below NF4's own (~-21 dB).
constexpr int kNF4Steps = 63;
constexpr int kNF4Zero = 64;
struct NF4U8 {
  uint8_t v[16];
  NF4U8() {
    for (int i = 0; i < 16; ++i) v[i] = static_cast<uint8_t>(std::lrint(kNF4Steps * kNF4[i]) + kNF4Zero);
  }
};
const NF4U8 kNF4u8;

bool use_quant_simd() {
#if PYHAPPY_HAVE_AVX2_KERNELS
  static const bool f16c = __builtin_cpu_supports("f16c");
  return use_avx2() && f16c;
#else
  return false;
#endif
}

struct Packed {
  const uint8_t* qdata;
  const void* scales;  // float (nf4) or at::Half (int)
  const uint8_t* zeros;
  int fmt;
  int64_t N, K, G, group_size, KB, block_bytes;
  int64_t block_step;  // bytes from a tile's block to its next (quant::block_stride)

  int bits() const { return quant::bits_of(fmt); }
  const uint8_t* block(int64_t t, int64_t b) const { return qdata + quant::block_offset(t, b, KB, block_bytes); }
  // Per-group parameter of row r of tile t, group g, as float.
  float scale(int64_t t, int64_t g, int64_t r) const {
    const int64_t i = quant::param_index(t, G, g, r);
    return fmt == 0 ? static_cast<const float*>(scales)[i] : static_cast<float>(static_cast<const at::Half*>(scales)[i]);
  }
  float zero(int64_t t, int64_t g, int64_t r) const { return static_cast<float>(zeros[quant::param_index(t, G, g, r)]); }
};

// cpu::parallel_for over the N8 tiles (even) in whole pairs: every chunk starts at an even tile, so a
// kernel that decodes a pair side by side reads the pair's interleaved blocks as one stream.
template <class F>
void parallel_tiles(int64_t N8, int64_t grain, const F& f) {
  cpu::parallel_for(0, N8 / 2, std::max<int64_t>(1, grain / 2), [&](int64_t p0, int64_t p1) { f(2 * p0, 2 * p1); });
}

// The exact decode kernel's activations: x as fp32 [M, K] (the caller's buffer for fp32 input)
// and, for int formats, Σ_{k in g} x[m, k] per row and group [M, G] (summed in fp32, k in order).
struct FloatActs {
  const float* x;
  const float* xsum;
  const float* unscale = nullptr;  // int4 / int3 on AVX2: per row, the factor back from the scaled products
};

// int8_decode: the activations quantized per 32-element block.
struct QuantActs {
  std::vector<int8_t> q;      // [M, K]
  std::vector<float> d;       // [M, KB] block scales
  std::vector<float> zterm;   // [M, G]  Σ_{b in g} d_b · Σ q_b   (int formats' zero-point term)
};

Packed make_packed(const char* op, const at::Tensor& qdata, const at::Tensor& scales,
                   const std::optional<at::Tensor>& zeros, int64_t fmt, int64_t N, int64_t K, int64_t group_size) {
  TORCH_CHECK(fmt >= 0 && fmt <= 2, op, ": fmt must be 0 (nf4), 1 (int4) or 2 (int3), got ", fmt);
  TORCH_CHECK(N >= 1, op, ": N must be >= 1, got ", N);
  TORCH_CHECK(group_size > 0 && group_size % kBlockK == 0 && K % group_size == 0, op,
              ": group_size must be a positive multiple of 32 dividing K = ", K, ", got ", group_size);
  const int64_t N8 = quant::tile_count(N), KB = K / kBlockK, G = K / group_size;
  const int64_t bb = quant::block_bytes(static_cast<int>(fmt));
  TORCH_CHECK(qdata.is_cpu() && scales.is_cpu() && (!zeros.has_value() || zeros->is_cpu()), op,
              ": qdata, scales and zeros must be CPU tensors, got qdata on ", qdata.device(), ", scales on ",
              scales.device(), zeros.has_value() ? ", zeros on " + zeros->device().str() : std::string());
  TORCH_CHECK(qdata.scalar_type() == at::kByte && qdata.dim() == 3 && qdata.size(0) == N8 / 2 && qdata.size(1) == KB &&
                  qdata.size(2) == 2 * bb && qdata.is_contiguous(),
              op, ": qdata must be a contiguous uint8 [", N8 / 2, ", ", KB, ", ", 2 * bb, "] tensor, got ",
              qdata.scalar_type(), " ", qdata.sizes());
  const auto sdt = fmt == 0 ? at::kFloat : at::kHalf;
  TORCH_CHECK(scales.scalar_type() == sdt && scales.dim() == 3 && scales.size(0) == N8 && scales.size(1) == G &&
                  scales.size(2) == kTileN && scales.is_contiguous(),
              op, ": scales must be a contiguous ", sdt, " [", N8, ", ", G, ", 8] tensor, got ", scales.scalar_type(),
              " ", scales.sizes());
  const uint8_t* zp = nullptr;
  if (fmt == 0) {
    TORCH_CHECK(!zeros.has_value(), op, ": zeros must be None for nf4 (fmt 0)");
  } else {
    TORCH_CHECK(zeros.has_value() && zeros->scalar_type() == at::kByte && zeros->sizes() == scales.sizes() &&
                    zeros->is_contiguous(),
                op, ": zeros must be a contiguous uint8 tensor shaped like scales for int formats");
    zp = zeros->const_data_ptr<uint8_t>();
  }
  return Packed{qdata.const_data_ptr<uint8_t>(), scales.const_data_ptr(), zp, static_cast<int>(fmt), N, K, G,
                group_size, KB, bb, 2 * bb};
}

// ---- codes of one 8 x 32 block, row-major ------------------------------------------------------

void block_codes_portable(const uint8_t* blk, int bits, uint8_t out[kTileN][kBlockK]) {
  for (int r = 0; r < kTileN; ++r) {
    for (int k = 0; k < kBlockK; ++k) out[r][k] = static_cast<uint8_t>(quant::block_code(blk, bits, r, k));
  }
}

#if PYHAPPY_HAVE_AVX2_KERNELS
// The SIMD decode kernels, once per instruction set (see quant_linear_decode.h).
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
constexpr bool kVnni = false;
#include "cpu/quant_linear_decode.h"
#include "cpu/quant_linear_decode_float.h"
#include "cpu/quant_linear_decode_bf16.h"
#include "cpu/quant_linear_decode_digits.h"
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
namespace vnni {
constexpr bool kVnni = true;
#include "cpu/quant_linear_decode.h"
}  // namespace vnni
#pragma GCC pop_options

// Row-major codes of one block: code vector j holds, per 128-bit lane, rows (0..3 | 4..7) x 4 k.
PYHAPPY_TARGET_QUANT inline void block_codes_avx2(const uint8_t* blk, int bits, uint8_t out[kTileN][kBlockK]) {
  __m256i c[8];
  if (bits == 4) {
    avx2::block_codes<quant::kFmtInt4>(blk, c);  // raw 4-bit codes (nf4 too: no table here)
  } else {
    avx2::block_codes<quant::kFmtInt3>(blk, c);
  }
  alignas(32) uint8_t tmp[32];
  for (int i = 0; i < 8; ++i) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), c[i]);
    for (int r = 0; r < kTileN; ++r) std::memcpy(&out[r][4 * i], tmp + 4 * r, 4);
  }
}
#endif

// ---- dequantize a slab (rows of whole tiles x a range of blocks) into T -----------------------

template <typename T>
inline T from_float(float v) {
  return static_cast<T>(v);
}

// out[(n - 8·t0) · ldo + (k - 32·b0)] = w[n, k] for tiles [t0, t1) (rows < N only), blocks [b0, b1).
template <typename T>
void dequant_slab(const Packed& P, int64_t t0, int64_t t1, int64_t b0, int64_t b1, T* out, int64_t ldo) {
#if PYHAPPY_HAVE_AVX2_KERNELS
  const bool simd = use_quant_simd();
#endif
  const int64_t bpg = P.group_size / kBlockK;
  alignas(32) uint8_t codes[kTileN][kBlockK];
  alignas(32) float vals[kBlockK];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t rows = std::min<int64_t>(kTileN, P.N - t * kTileN);
    if (rows <= 0) break;  // tiles of padding rows only
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* blk = P.block(t, b);
#if PYHAPPY_HAVE_AVX2_KERNELS
      if (simd) {
        block_codes_avx2(blk, P.bits(), codes);
      } else {
        block_codes_portable(blk, P.bits(), codes);
      }
#else
      block_codes_portable(blk, P.bits(), codes);
#endif
      const int64_t g = b / bpg;
      for (int64_t r = 0; r < rows; ++r) {
        const float s = P.scale(t, g, r), z = P.fmt == 0 ? 0.0f : P.zero(t, g, r);
        for (int k = 0; k < kBlockK; ++k) vals[k] = quant::dequant(P.fmt, codes[r][k], s, z, kNF4);
        T* o = out + ((t - t0) * kTileN + r) * ldo + (b - b0) * kBlockK;
        for (int k = 0; k < kBlockK; ++k) o[k] = from_float<T>(vals[k]);
      }
    }
  }
}

// ---- decode kernel ------------------------------------------------------------------------------

template <typename T>
void quantize_acts(const T* x, int64_t M, int64_t K, int64_t group_size, QuantActs& a) {
  const int64_t KB = K / kBlockK, G = K / group_size, bpg = group_size / kBlockK;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < KB; ++b) {
      const T* xb = x + m * K + b * kBlockK;
      float amax = 0.0f;
      bool finite = true;
      for (int k = 0; k < kBlockK; ++k) {
        const float v = static_cast<float>(xb[k]);
        finite = finite && std::isfinite(v);
        amax = std::max(amax, std::fabs(v));
      }
      // A NaN or Inf in the block makes its scale NaN, so every output it touches is NaN (as the
      // float product would be) instead of being masked by the int8 rounding; its codes are 0 (a NaN
      // cast to int is undefined behaviour).
      const float d = finite ? amax / 127.0f : std::numeric_limits<float>::quiet_NaN();
      const float inv = finite && amax > 0.0f ? 127.0f / amax : 0.0f;
      int32_t sum = 0;
      for (int k = 0; k < kBlockK; ++k) {
        const int32_t q = static_cast<int32_t>(std::nearbyint(static_cast<float>(xb[k]) * inv));
        a.q[m * K + b * kBlockK + k] = static_cast<int8_t>(std::clamp(q, -127, 127));
        sum += a.q[m * K + b * kBlockK + k];
      }
      a.d[m * KB + b] = d;
      a.zterm[m * G + b / bpg] += d * static_cast<float>(sum);
    }
  }
}

// y[m, n] for tiles [t0, t1), all m < M. Portable: identical arithmetic, scalar.
void gemv_tiles_portable(const Packed& P, const QuantActs& a, int64_t M, int64_t t0, int64_t t1, float* y) {
  const int64_t bpg = P.group_size / kBlockK;
  uint8_t codes[kTileN][kBlockK];
  std::vector<float> acc(M * kTileN), gacc(M * kTileN);
  for (int64_t t = t0; t < t1; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t g = 0; g < P.G; ++g) {
      std::fill(gacc.begin(), gacc.end(), 0.0f);
      for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
        block_codes_portable(P.block(t, b), P.bits(), codes);
        for (int64_t m = 0; m < M; ++m) {
          const int8_t* xq = a.q.data() + m * P.K + b * kBlockK;
          for (int r = 0; r < kTileN; ++r) {
            int32_t dot = 0;
            for (int k = 0; k < kBlockK; ++k) {
              const int32_t w = P.fmt == 0 ? kNF4u8.v[codes[r][k]] : codes[r][k];
              dot += w * xq[k];
            }
            gacc[m * kTileN + r] += a.d[m * P.KB + b] * static_cast<float>(dot);
          }
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        for (int r = 0; r < kTileN; ++r) {
          const float s = P.scale(t, g, r);
          float v = gacc[m * kTileN + r];
          if (P.fmt == 0) {
            v = (v - kNF4Zero * a.zterm[m * P.G + g]) * (1.0f / kNF4Steps);
          } else {
            v -= P.zero(t, g, r) * a.zterm[m * P.G + g];
          }
          acc[m * kTileN + r] += s * v;
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      for (int r = 0; r < kTileN && t * kTileN + r < P.N; ++r) y[m * P.N + t * kTileN + r] = acc[m * kTileN + r];
    }
  }
}

template <typename T>
void quantize_acts_best(SimdLevel level, const T* x, int64_t M, int64_t K, int64_t group_size, QuantActs& a) {
#if PYHAPPY_HAVE_AVX2_KERNELS
  if (level >= SimdLevel::kAvx2) return avx2::quantize_acts_simd(x, M, K, group_size, a);
#endif
  quantize_acts(x, M, K, group_size, a);
}

// Exact decode, portable: per tile, group, row and activation row, the same algebra in scalar fp32.
void gemv_tiles_float_portable(const Packed& P, const FloatActs& a, int64_t M, int64_t t0, int64_t t1, float* y) {
  const int64_t bpg = P.group_size / kBlockK;
  uint8_t codes[kTileN][kBlockK];
  std::vector<float> acc(M * kTileN), gacc(M * kTileN);
  for (int64_t t = t0; t < t1; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t g = 0; g < P.G; ++g) {
      std::fill(gacc.begin(), gacc.end(), 0.0f);
      for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
        block_codes_portable(P.block(t, b), P.bits(), codes);
        for (int64_t m = 0; m < M; ++m) {
          const float* xb = a.x + m * P.K + b * kBlockK;
          for (int r = 0; r < kTileN; ++r) {
            float dot = gacc[m * kTileN + r];
            for (int k = 0; k < kBlockK; ++k) {
              dot = std::fma(quant::dot_code(P.fmt, codes[r][k], kNF4), xb[k], dot);
            }
            gacc[m * kTileN + r] = dot;
          }
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        for (int r = 0; r < kTileN; ++r) {
          float v = gacc[m * kTileN + r];
          if (P.fmt != quant::kFmtNF4) v = std::fma(-P.zero(t, g, r), a.xsum[m * P.G + g], v);
          acc[m * kTileN + r] = std::fma(P.scale(t, g, r), v, acc[m * kTileN + r]);
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      for (int r = 0; r < kTileN && t * kTileN + r < P.N; ++r) y[m * P.N + t * kTileN + r] = acc[m * kTileN + r];
    }
  }
}

// x · deq(W)ᵀ in fp32 [M, N] for M <= kDecodeMaxM: the exact kernel, or with int8_decode the
// int8-activation one. int_dot asks for the exact integer kernel (quant_linear_decode_digits.h)
// where it serves (1-2 rows, int4 / int3, AVX512-VNNI, x within its range); elsewhere it is ignored.
at::Tensor decode_product(const Packed& P, const at::Tensor& x, bool int8_decode, bool int_dot = false) {
  const int64_t M = x.size(0);
  const SimdLevel level = use_quant_simd() ? simd_level_in_use() : SimdLevel::kPortable;
  at::Tensor y = at::empty({M, P.N}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const int64_t N8 = quant::tile_count(P.N);
#if PYHAPPY_HAVE_AVX2_KERNELS
  if (int_dot && !int8_decode && M <= 2 && P.fmt != quant::kFmtNF4 && level >= SimdLevel::kAvx512 &&
      use_avx512vnni()) {
    const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
    const int D = x.scalar_type() == at::kFloat ? avx2::ddec::kDigitsFp32 : avx2::ddec::kDigits16;
    std::vector<int8_t> xd(M * D * P.K);
    std::vector<int32_t> zsum(M * P.G * D);
    std::vector<float> gscale(M * P.G), unscale(M);
    const float* xp = xf.const_data_ptr<float>();
    bool ok = true;
    for (int64_t m = 0; m < M && ok; ++m) {
      int8_t* xdm = xd.data() + m * D * P.K;
      int32_t* zm = zsum.data() + m * P.G * D;
      float* gm = gscale.data() + m * P.G;
      ok = D == 4 ? avx2::ddec::prepare<4>(xp + m * P.K, P.K, P.group_size, xdm, zm, gm, unscale[m])
                  : avx2::ddec::prepare<3>(xp + m * P.K, P.K, P.group_size, xdm, zm, gm, unscale[m]);
    }
    if (ok) {
      const avx2::ddec::DigitActs a{xd.data(), zsum.data(), gscale.data(), unscale.data()};
      parallel_tiles(N8, 8, [&](int64_t t0, int64_t t1) {
        if (D == 4) return avx2::ddec::decode_tiles<4>(P, a, M, t0, t1, yp);
        avx2::ddec::decode_tiles<3>(P, a, M, t0, t1, yp);
      });
      return y;
    }
  }
  // bf16 activations, int4 or int3, on AVX512-BF16 CPUs: bf16 dot products (quant_linear_decode_bf16.h),
  // unless a row is outside the range where that kernel is exact. Above 4 rows the kernel takes
  // chunks of 8: the arrays are padded to a multiple of 8 rows of zeros.
  if (!int8_decode && x.scalar_type() == at::kBFloat16 && P.fmt != quant::kFmtNF4 && M <= kDecodeMaxM &&
      level >= SimdLevel::kAvx512 && use_avx512bf16()) {
    const int64_t Mp = M <= 4 ? M : (M + 7) / 8 * 8;
    std::vector<uint32_t> x2(Mp * P.K / 2, 0u);
    std::vector<float> xsum(Mp * P.G, 0.0f), unscale(Mp, 1.0f);
    if (avx2::bdec::prepare_bf16_pairs(reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>()), M, P.K,
                                       P.group_size, x2.data(), xsum.data(), unscale.data())) {
      const avx2::bdec::Bf16Acts a{x2.data(), xsum.data(), unscale.data()};
      parallel_tiles(N8, 8, [&](int64_t t0, int64_t t1) { avx2::bdec::decode_tiles(P, a, M, t0, t1, yp); });
      return y;
    }
  }
#endif
  if (!int8_decode) {
    const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
    const float* xp = xf.const_data_ptr<float>();
    bool simd = false;
#if PYHAPPY_HAVE_AVX2_KERNELS
    simd = level >= SimdLevel::kAvx2;
#endif
    std::vector<float> xsum;
    if (P.fmt != quant::kFmtNF4) {
      xsum.assign(M * P.G, 0.0f);
#if PYHAPPY_HAVE_AVX2_KERNELS
      if (simd) avx2::fdec::group_sums(xp, M, P.K, P.group_size, xsum.data());
#endif
      if (!simd) {
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t g = 0; g < P.G; ++g) {
            float s = 0.0f;
            for (int64_t k = g * P.group_size; k < (g + 1) * P.group_size; ++k) s += xp[m * P.K + k];
            xsum[m * P.G + g] = s;
          }
        }
      }
    }
    // int4 / int3 on AVX2: x pre-multiplied per row and k (quant_linear_decode_float.h,
    // prepare_scaled_acts); a call with a row outside the range where that is exact takes the
    // portable kernel.
    std::vector<float> xs, xsum_scaled, unscale;
#if PYHAPPY_HAVE_AVX2_KERNELS
    if (simd && P.fmt != quant::kFmtNF4) {
      xs.resize(M * P.K);
      xsum_scaled.resize(M * P.G);
      unscale.resize(M);
      simd = P.fmt == quant::kFmtInt4
                 ? avx2::fdec::prepare_scaled_acts<quant::kFmtInt4>(xp, M, P.K, P.group_size, xsum.data(), xs.data(),
                                                                     xsum_scaled.data(), unscale.data())
                 : avx2::fdec::prepare_scaled_acts<quant::kFmtInt3>(xp, M, P.K, P.group_size, xsum.data(), xs.data(),
                                                                     xsum_scaled.data(), unscale.data());
      if (!simd) xs.clear();
    }
#endif
    const float* xk = xs.empty() ? xp : xs.data();
    // Rows in chunks of kDecodeMaxM (only quant_gemv_cpu passes more).
    for (int64_t m0 = 0; m0 < M; m0 += kDecodeMaxM) {
      const int64_t mc = std::min(kDecodeMaxM, M - m0);
      const bool scaled = !xs.empty();
      const std::vector<float>& sums = scaled ? xsum_scaled : xsum;
      const FloatActs a{xk + m0 * P.K, sums.empty() ? nullptr : sums.data() + m0 * P.G,
                        scaled ? unscale.data() + m0 : nullptr};
      float* yc = yp + m0 * P.N;
      parallel_tiles(N8, 8, [&](int64_t t0, int64_t t1) {
#if PYHAPPY_HAVE_AVX2_KERNELS
        if (simd) {
          const avx2::fdec::DazOff daz;
          return avx2::decode_tiles_float(P, a, mc, t0, t1, yc);
        }
#endif
        gemv_tiles_float_portable(P, a, mc, t0, t1, yc);
      });
    }
    return y;
  }
  QuantActs a{std::vector<int8_t>(M * P.K), std::vector<float>(M * P.KB), std::vector<float>(M * P.G, 0.0f)};
  if (x.scalar_type() == at::kFloat) {
    quantize_acts_best(level, x.const_data_ptr<float>(), M, P.K, P.group_size, a);
  } else if (x.scalar_type() == at::kHalf) {
    quantize_acts_best(level, x.const_data_ptr<at::Half>(), M, P.K, P.group_size, a);
  } else {
    quantize_acts_best(level, x.const_data_ptr<at::BFloat16>(), M, P.K, P.group_size, a);
  }
  parallel_tiles(N8, 8, [&](int64_t t0, int64_t t1) {
#if PYHAPPY_HAVE_AVX2_KERNELS
    if (level >= SimdLevel::kAvx2 && use_avxvnni()) return vnni::decode_tiles(P, a, M, t0, t1, yp);
    if (level >= SimdLevel::kAvx2) return avx2::decode_tiles(P, a, M, t0, t1, yp);
#endif
    gemv_tiles_portable(P, a, M, t0, t1, yp);
  });
  return y;
}

// ---- GEMM path ----------------------------------------------------------------------------------

// Units (row tiles or column blocks) per slab: a slab of unit_bytes-sized units stays within ~2 MiB
// (a thread's share of L3), and there are at least two slabs per thread when the weight allows.
int64_t slab_units(int64_t units, int64_t unit_bytes, int64_t cap) {
  const int64_t by_cache = std::max<int64_t>(1, (2 << 20) / std::max<int64_t>(1, unit_bytes));
  const int64_t by_threads = std::max<int64_t>(1, (units + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads()));
  return std::clamp<int64_t>(std::min(by_cache, by_threads), 1, cap);
}

// Worker threads of at::parallel_for do not inherit the dispatcher's "below autograd" state, so
// every tensor a worker passes to an ATen op is detached (these ops are never differentiated here).
// bf16 where the CPU has no native bf16 dot products (cpu/gemm.h): the slabs are dequantized to fp32
// and multiplied by the fp32 GEMM against x (or dy) converted once, each output slab rounded once.
at::Tensor gemm_product(const Packed& P, const at::Tensor& x_in) {
  const at::Tensor x = x_in.detach();
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, P.N}, x.options());
  const at::Tensor xa = gemm::via_fp32(x.scalar_type(), M, P.K, P.N, /*b_col_major=*/true) ? x.to(at::kFloat) : x;
  const int64_t N8 = quant::tile_count(P.N);
  const int64_t st = slab_units(N8, kTileN * P.K * xa.element_size(), 64);
  const int64_t nslab = (N8 + st - 1) / st;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xa.scalar_type(), "pyhappy_quant_gemm", [&] {
    cpu::parallel_for(0, nslab, 1, [&](int64_t s0, int64_t s1) {
      at::Tensor buf = at::empty({st * kTileN, P.K}, xa.options());
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t t0 = s * st, t1 = std::min(N8, t0 + st);
        const int64_t n0 = t0 * kTileN, rows = std::min(P.N, t1 * kTileN) - n0;
        if (rows <= 0) continue;  // a slab of padding rows only
        dequant_slab<scalar_t>(P, t0, t1, 0, P.KB, buf.data_ptr<scalar_t>(), P.K);
        at::Tensor out = y.narrow(1, n0, rows);
        gemm::mm_into(out, xa, buf.narrow(0, 0, rows).t());
      }
    });
  });
  return y;
}

// dx = dy · deq(W), over column slabs of W (each thread owns its columns of dx).
at::Tensor grad_input(const Packed& P, const at::Tensor& dy_in) {
  const at::Tensor dy = dy_in.detach();
  const int64_t M = dy.size(0);
  at::Tensor dx = at::empty({M, P.K}, dy.options());
  const at::Tensor da = gemm::via_fp32(dy.scalar_type(), M, P.N, P.K, /*b_col_major=*/false) ? dy.to(at::kFloat) : dy;
  const int64_t N8 = quant::tile_count(P.N);
  const int64_t rows_pad = N8 * kTileN;
  const int64_t bps = slab_units(P.KB, rows_pad * kBlockK * da.element_size(), P.KB);
  const int64_t nslab = (P.KB + bps - 1) / bps;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, da.scalar_type(), "pyhappy_quant_grad_input", [&] {
    cpu::parallel_for(0, nslab, 1, [&](int64_t s0, int64_t s1) {
      at::Tensor buf = at::empty({rows_pad, bps * kBlockK}, da.options());
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t b0 = s * bps, b1 = std::min(P.KB, b0 + bps);
        const int64_t cols = (b1 - b0) * kBlockK;
        dequant_slab<scalar_t>(P, 0, N8, b0, b1, buf.data_ptr<scalar_t>(), bps * kBlockK);
        at::Tensor out = dx.narrow(1, b0 * kBlockK, cols);
        gemm::mm_into(out, da, buf.narrow(0, 0, P.N).narrow(1, 0, cols));
      }
    });
  });
  return dx;
}

void check_x(const char* op, const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D [M, K] here, got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kDouble,
              op, ": ", name, " must be float32, bfloat16, float16 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
}

void check_lora(const char* op, const at::Tensor& x, int64_t N, const std::optional<at::Tensor>& A,
                const std::optional<at::Tensor>& B, const std::optional<at::Tensor>& C) {
  TORCH_CHECK(A.has_value() == B.has_value(), op, ": lora_A and lora_B must be given together");
  TORCH_CHECK(A.has_value() || !C.has_value(), op, ": lora_C needs lora_A and lora_B");
  if (!A) return;
  const int64_t r = A->size(0);
  TORCH_CHECK(A->dim() == 2 && A->size(1) == x.size(1), op, ": lora_A must be [r, K], got ", A->sizes());
  TORCH_CHECK(B->dim() == 2 && B->size(0) == N && B->size(1) == r, op, ": lora_B must be [N, r] = [", N, ", ", r,
              "], got ", B->sizes());
  if (C) TORCH_CHECK(C->dim() == 2 && C->size(0) == r && C->size(1) == r, op, ": lora_C must be [r, r]");
  for (const auto* t : {&*A, &*B}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": the adapter must share x's dtype ", x.scalar_type());
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quant_linear_cpu(const at::Tensor& x_in, const at::Tensor& qdata,
                                                    const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                                    int64_t fmt, int64_t N, int64_t group_size,
                                                    const std::optional<at::Tensor>& bias,
                                                    const std::optional<at::Tensor>& lora_A,
                                                    const std::optional<at::Tensor>& lora_B,
                                                    const std::optional<at::Tensor>& lora_C, double scaling,
                                                    double dropout_p, const std::optional<at::Tensor>& seed,
                                                    bool int8_decode, bool int_dot) {
  const char* op = "quant_linear_cpu";
  check_x(op, x_in, "x");
  const at::Tensor x = x_in.contiguous();
  const Packed P = make_packed(op, qdata, scales, zeros, fmt, N, x.size(1), group_size);
  check_lora(op, x, N, lora_A, lora_B, lora_C);
  if (bias) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [N] = [", N, "]");
  const int64_t M = x.size(0);
  at::Tensor y;
  if (M == 0) {
    y = at::zeros({0, N}, x.options());
  } else if (M <= kDecodeMaxM && x.scalar_type() != at::kDouble) {
    y = decode_product(P, x, int8_decode, int_dot);
    if (x.scalar_type() != at::kFloat) y = y.to(x.scalar_type());
  } else {
    y = gemm_product(P, x);
  }
  if (!lora_A) {
    if (bias) y.add_(*bias);
    return {y, at::empty({M, 0}, x.options())};
  }
  at::Tensor u = lora_adapter_forward(x, y, bias, lora_A->contiguous(), *lora_B, lora_C, scaling, dropout_p, seed);
  return {y, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quant_linear_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& qdata, const at::Tensor& scales,
    const std::optional<at::Tensor>& zeros, int64_t fmt, int64_t group_size, const std::optional<at::Tensor>& lora_A,
    const std::optional<at::Tensor>& lora_B, const std::optional<at::Tensor>& lora_C, const at::Tensor& lora_hidden,
    double scaling, double dropout_p, const std::optional<at::Tensor>& seed, bool need_grad_x) {
  const char* op = "quant_linear_backward_cpu";
  check_x(op, x_in, "x");
  check_x(op, grad_out_in, "grad_out");
  const at::Tensor x = x_in.contiguous(), dy = grad_out_in.contiguous();
  const int64_t N = dy.size(1);
  TORCH_CHECK(dy.size(0) == x.size(0), op, ": grad_out must be [M, N] with M = ", x.size(0));
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), op, ": grad_out must share x's dtype");
  const Packed P = make_packed(op, qdata, scales, zeros, fmt, N, x.size(1), group_size);
  check_lora(op, x, N, lora_A, lora_B, lora_C);
  const auto empty = at::empty({0}, x.options());
  at::Tensor gx = need_grad_x ? (x.size(0) ? grad_input(P, dy) : at::zeros_like(x)) : empty;
  if (!lora_A) return {gx, empty, empty.clone(), empty.clone()};
  auto [gA, gB, gC] = lora_adapter_backward(dy, x, lora_A->contiguous(), *lora_B, lora_C, lora_hidden, scaling,
                                            dropout_p, seed, need_grad_x ? &gx : nullptr);
  return {gx, gA, gB, gC};
}

at::Tensor quant_dequantize_cpu(const at::Tensor& qdata, const at::Tensor& scales,
                                const std::optional<at::Tensor>& zeros, int64_t fmt, int64_t N, int64_t K,
                                int64_t group_size, at::ScalarType dtype) {
  const Packed P = make_packed("quant_dequantize_cpu", qdata, scales, zeros, fmt, N, K, group_size);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kDouble || dtype == at::kHalf,
              "quant_dequantize_cpu: dtype must be a floating dtype, got ", dtype);
  at::Tensor out = at::empty({N, K}, qdata.options().dtype(dtype));
  const int64_t N8 = quant::tile_count(N);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "pyhappy_quant_dequantize", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    parallel_tiles(N8, 4, [&](int64_t t0, int64_t t1) {
      dequant_slab<scalar_t>(P, t0, t1, 0, P.KB, o + t0 * kTileN * K, K);
    });
  });
  return out;
}

at::Tensor quant_gemv_cpu(const at::Tensor& x_in, const at::Tensor& qdata, const at::Tensor& scales,
                          const std::optional<at::Tensor>& zeros, int64_t fmt, int64_t N, int64_t group_size,
                          bool int8_decode, bool int_dot) {
  check_x("quant_gemv_cpu", x_in, "x");
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(x.scalar_type() != at::kDouble, "quant_gemv_cpu: x must be float32, bfloat16 or float16");
  const Packed P = make_packed("quant_gemv_cpu", qdata, scales, zeros, fmt, N, x.size(1), group_size);
  return decode_product(P, x, int8_decode, int_dot);
}

// A training call of pyhappy::quant_linear (dropout off, exact products) as one C++ autograd node:
// each pass runs the candidate the tuner decided for the layer (the kernels above, "cpp", or the
// unfused formulation on ATen, "torch": the weight dequantized, then the products of
// lora_products_forward / _backward, as pyhappy/ops/quant_linear.py's _torch_forward / _torch_backward),
// with the registered op's gradient formula (pyhappy/ops/quant_linear.py, _backward: a frozen
// adapter still adds its share of dx; a trained bias gets dy's column sums). See LoraLinearStep in
// lora_linear.cpp for why one C++ node.
struct QuantLinearStep : public torch::autograd::Function<QuantLinearStep> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& qdata,
                            const at::Tensor& scales, const std::optional<at::Tensor>& zeros, int64_t fmt, int64_t N,
                            int64_t group_size, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& lora_A, const std::optional<at::Tensor>& lora_B,
                            const std::optional<at::Tensor>& lora_C, double scaling, bool torch_fwd, bool torch_bwd) {
    const int64_t K = x.size(-1);
    const at::Tensor x2 = x.reshape({-1, K}).contiguous();
    at::Tensor y, u;
    if (torch_fwd) {
      const at::Tensor w = quant_dequantize_cpu(qdata, scales, zeros, fmt, N, K, group_size, x2.scalar_type());
      if (lora_A) {
        std::tie(y, u) = lora_products_forward(x2, w, bias, *lora_A, *lora_B, lora_C, scaling);
      } else {
        y = at::linear(x2, w, bias);
        u = at::empty({x2.size(0), 0}, x2.options());
      }
    } else {
      std::tie(y, u) = quant_linear_cpu(x2, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C,
                                        scaling, 0.0, std::nullopt, false, false);
    }
    const auto opt = [](const std::optional<at::Tensor>& t) { return t ? *t : at::Tensor(); };
    const auto trains = [](const std::optional<at::Tensor>& t) { return t && t->defined() && t->requires_grad(); };
    ctx->saved_data["fmt"] = fmt;
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["torch_bwd"] = torch_bwd;
    // Which gradients the backward computes: those of the inputs that require grad now, as the
    // registered op's autograd.Function reads them (its needs_input_grad is fixed at the forward).
    ctx->saved_data["needs"] = c10::List<bool>({x.requires_grad(), trains(bias), trains(lora_A), trains(lora_B),
                                                trains(lora_C)});
    ctx->save_for_backward({x, qdata, scales, opt(zeros), opt(lora_A), opt(lora_B), opt(lora_C), u});
    return node_output(y, x, N);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto opt = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
    const at::Tensor &x = saved[0], &qdata = saved[1], &scales = saved[2], &u = saved[7];
    const std::optional<at::Tensor> zeros = opt(saved[3]), lora_A = opt(saved[4]), lora_B = opt(saved[5]),
                                    lora_C = opt(saved[6]);
    const int64_t fmt = ctx->saved_data["fmt"].toInt(), group_size = ctx->saved_data["group_size"].toInt();
    const double scaling = ctx->saved_data["scaling"].toDouble();
    check_first_order("pyhappy::quant_linear");
    const c10::List<bool> needs = ctx->saved_data["needs"].toBoolList();
    const bool need_x = needs[0], need_b = needs[1], need_A = needs[2], need_B = needs[3], need_C = needs[4];
    const int64_t K = x.size(-1), M = K == 0 ? 0 : x.numel() / K, N = grads[0].size(-1);
    const bool lora = lora_A && (need_A || need_B || need_C);  // a frozen adapter leaves the backward op
    const at::Tensor dy = grads[0].reshape({M, N}), dyc = dy.contiguous(), x2 = x.reshape({M, K}).contiguous();
    at::Tensor gx, gA, gB, gC;
    if (ctx->saved_data["torch_bwd"].toBool()) {
      const at::Tensor w = quant_dequantize_cpu(qdata, scales, zeros, fmt, N, K, group_size, x2.scalar_type());
      if (lora) {
        std::tie(gx, gA, gB, gC) = lora_products_backward(dyc, x2, w, *lora_A, *lora_B, lora_C, u, scaling, need_x,
                                                          need_A, need_B, need_C);
      } else if (need_x) {
        gx = dyc.mm(w);
      }
    } else {
      const std::optional<at::Tensor> none;
      std::tie(gx, gA, gB, gC) = quant_linear_backward_cpu(
          dyc, x2, qdata, scales, zeros, fmt, group_size, lora ? lora_A : none, lora ? lora_B : none,
          lora ? lora_C : none, lora ? u : u.new_empty({M, 0}), scaling, 0.0, std::nullopt, need_x);
    }
    if (need_x && !lora && lora_A) {  // the frozen adapter's share of dx: s · dy B (C) A
      at::Tensor dv = at::mul(dy.mm(*lora_B), at::native::wrapped_scalar_tensor(scaling));
      const at::Tensor du = lora_C ? dv.mm(*lora_C) : dv;
      gx = gx.reshape(x.sizes()) + du.mm(*lora_A).reshape(x.sizes());
    }
    return {need_x ? gx.reshape(x.sizes()) : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            need_b ? dy.sum(0) : at::Tensor(),
            need_A ? gA : at::Tensor(),
            need_B ? gB : at::Tensor(),
            need_C ? gC : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor quant_linear_step(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                             const std::optional<at::Tensor>& zeros, int64_t fmt, int64_t N, int64_t group_size,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lora_A,
                             const std::optional<at::Tensor>& lora_B, const std::optional<at::Tensor>& lora_C,
                             double scaling, bool torch_fwd, bool torch_bwd) {
  return QuantLinearStep::apply(x, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C, scaling,
                                torch_fwd, torch_bwd);
}

}  // namespace cpu
}  // namespace pyhappy

TORCH_LIBRARY_FRAGMENT(pyhappy, m) {
  m.def(
      "quant_linear_cpu(Tensor x, Tensor qdata, Tensor scales, Tensor? zeros, int fmt, int N, int group_size, "
      "Tensor? bias, Tensor? lora_A, Tensor? lora_B, Tensor? lora_C, float scaling, float dropout_p, Tensor? seed, "
      "bool int8_decode=False, bool int_dot=False) -> (Tensor, Tensor)");
  m.def(
      "quant_linear_backward_cpu(Tensor grad_out, Tensor x, Tensor qdata, Tensor scales, Tensor? zeros, int fmt, "
      "int group_size, Tensor? lora_A, Tensor? lora_B, Tensor? lora_C, Tensor lora_hidden, float scaling, "
      "float dropout_p, Tensor? seed, bool need_grad_x) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "quant_dequantize_cpu(Tensor qdata, Tensor scales, Tensor? zeros, int fmt, int N, int K, int group_size, "
      "ScalarType dtype) -> Tensor");
  m.def(
      "quant_gemv_cpu(Tensor x, Tensor qdata, Tensor scales, Tensor? zeros, int fmt, int N, int group_size, "
      "bool int8_decode=False, bool int_dot=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyhappy, CPU, m) {
  m.impl("quant_linear_cpu", &pyhappy::cpu::quant_linear_cpu);
  m.impl("quant_linear_backward_cpu", &pyhappy::cpu::quant_linear_backward_cpu);
  m.impl("quant_dequantize_cpu", &pyhappy::cpu::quant_dequantize_cpu);
  m.impl("quant_gemv_cpu", &pyhappy::cpu::quant_gemv_cpu);
}
