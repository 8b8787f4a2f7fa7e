// CUDA decode kernel of pyhappy::quant_linear (M <= 16): y = x · deq(W)ᵀ + bias + LoRA + sparse delta,
// one pass over the packed 4/3-bit weight, the output written once.
//
// At decode sizes the product is bound by reading the packed weight (0.5 or 0.375 byte a weight),
// so the kernel is built around the loads: each CTA owns one 8-row tile and its kWarps warps split
// K; a warp step reads 512 contiguous bytes of 4-bit codes (one 16-byte load a lane) or 192 of
// 3-bit codes, the activations through the read-only cache, and keeps every activation row's
// partial sums in registers, so the weight is read once for all M rows. The index math, the
// unpacking, the per-group arithmetic and the epilogue are csrc/quant_linear_common.h's, shared
// with the CPU kernels and with the lane-by-lane CPU emulation (csrc/cpu/quant_linear_lanes.cpp)
// that the CPU test suite checks against the reference; the CUDA-only part is the loads, the warp
// butterfly (__shfl_xor_sync, all 32 lanes converged) and the cross-warp sum in shared memory.
// Never run on a GPU yet: see benchmarks/ROOFLINE.md for what the first run should show.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/quant_linear.h"
#include "quant_linear_common.h"

namespace pyhappy {
namespace cuda {
namespace {

using namespace pyhappy::quant;

__constant__ float kNF4Const[16] = PYHAPPY_NF4_TABLE;

__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

struct LdDevice {
  template <typename T>
  __device__ __forceinline__ float operator()(const T* p, int64_t i) const {
    return to_f(__ldg(p + i));
  }
};

// n (8 or 16) consecutive activations, 16-byte aligned, as float.
template <typename T, int n>
__device__ __forceinline__ void load_x(const T* p, float* out) {
  static_assert(sizeof(T) == 2 && n % 8 == 0, "8 half-precision values per 16-byte load");
  PYHAPPY_UNROLL
  for (int v = 0; v < n / 8; ++v) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + v);
    const T* e = reinterpret_cast<const T*>(&raw);
    PYHAPPY_UNROLL
    for (int i = 0; i < 8; ++i) out[8 * v + i] = to_f(e[i]);
  }
}

// At MB <= 2 the 4-bit kernels fit 64 registers a thread, so 4 CTAs share an SM and N = 4096 (512
// tiles) runs in one wave on 132 SMs; 3-bit (words from two vectors) fits 80 without spilling, 3 CTAs.
// Larger MB keep their accumulators in registers instead.
constexpr int min_ctas(int fmt, int mb) { return mb > 2 ? 1 : fmt == kFmtInt3 ? 3 : 4; }

template <int FMT, int MB, typename T>
__global__ void __launch_bounds__(kWarps * 32, min_ctas(FMT, MB)) quant_decode_kernel(QuantDecodeArgs a) {
  constexpr int R = rows_per_lane(FMT), KL = k_per_lane(FMT), BB = block_bytes(FMT);
  __shared__ float nf4[16];
  __shared__ float red[kWarps][MB][kTileN];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (FMT == kFmtNF4 && threadIdx.x < 16) nf4[threadIdx.x] = kNF4Const[threadIdx.x];
  __syncthreads();

  const int64_t t = blockIdx.x, K = a.K, KB = K / kBlockK, G = K / a.group_size;
  const int bpg = static_cast<int>(a.group_size / kBlockK);  // 32-bit: a 64-bit division per step costs a call
  const int M = static_cast<int>(a.M);
  const T* x = static_cast<const T*>(a.x);
  const uint8_t* tile = a.qdata + block_offset(t, 0, KB, BB);  // its blocks block_stride(FMT) apart

  float acc[MB][R];
  PYHAPPY_UNROLL
  for (int m = 0; m < MB; ++m) {
    PYHAPPY_UNROLL
    for (int i = 0; i < R; ++i) acc[m][i] = 0.0f;
  }

  const int64_t steps = num_steps(FMT, KB);
  for (int64_t step = warp; step < steps; step += kWarps) {
    const Lane g = lane_geometry(FMT, step, lane);
    if (g.block >= KB) continue;  // a ragged last step: these lanes add nothing
    const uint8_t* blk = tile + g.block * block_stride(FMT);
    // The weight streams through once: loaded evict-first (__ldcs) so it does not push x out of L1.
    uint32_t w[8];
    const uint4 v = __ldcs(reinterpret_cast<const uint4*>(blk + g.byte0));
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
    if (FMT == kFmtInt3) {
      const uint4 v1 = __ldcs(reinterpret_cast<const uint4*>(blk + g.byte1));
      w[4] = v1.x;
      w[5] = v1.y;
      w[6] = v1.z;
      w[7] = v1.w;
    }
    float c[R][KL];
    lane_codes<FMT>(w, g, nf4, c);
    const int grp = static_cast<int>(g.block) / bpg;
    float sc[R], zr[R];
    PYHAPPY_UNROLL
    for (int i = 0; i < R; ++i) {
      const int64_t pi = param_index(t, G, grp, g.row0 + i);
      if (FMT == kFmtNF4) {
        sc[i] = __ldg(static_cast<const float*>(a.scales) + pi);
        zr[i] = 0.0f;
      } else {
        sc[i] = __half2float(__ldg(static_cast<const __half*>(a.scales) + pi));
        zr[i] = static_cast<float>(__ldg(a.zeros + pi));
      }
    }
    const T* xk = x + g.block * kBlockK + g.k0;
    PYHAPPY_UNROLL
    for (int m = 0; m < MB; ++m) {
      if (m < M) {
        float xm[KL];
        load_x<T, KL>(xk + m * K, xm);
        lane_row<FMT>(c, xm, sc, zr, acc[m]);
      }
    }
  }

  // Lanes sharing rows hold partial sums over disjoint k: butterfly them together (every lane of
  // the warp reaches this point, so the full mask is converged).
  PYHAPPY_UNROLL
  for (int s = 0; s < butterfly_stages(FMT); ++s) {
    PYHAPPY_UNROLL
    for (int m = 0; m < MB; ++m) {
      PYHAPPY_UNROLL
      for (int i = 0; i < R; ++i) acc[m][i] += __shfl_xor_sync(0xffffffffu, acc[m][i], butterfly_mask(s));
    }
  }
  if (lane < holder_lanes(FMT)) {
    const int row0 = lane_geometry(FMT, 0, lane).row0;
    PYHAPPY_UNROLL
    for (int m = 0; m < MB; ++m) {
      PYHAPPY_UNROLL
      for (int i = 0; i < R; ++i) red[warp][m][row0 + i] = acc[m][i];
    }
  }
  __syncthreads();

  // Warp w finishes row n = 8t + w for every m: the warps' partials in warp order, then the epilogue's
  // dot products split across the lanes and butterflied (n < N and m < M are the same for the whole
  // warp, so every shuffle has all 32 lanes converged).
  static_assert(kWarps == kTileN, "one warp per row of the tile in the epilogue");
  const Epilogue<T, LdDevice> epi{static_cast<const T*>(a.bias), a.lora_v, static_cast<const T*>(a.lora_B), a.r,
                                  a.row_ptr, a.cols, static_cast<const T*>(a.values), a.sparse_scale};
  T* y = static_cast<T*>(a.y);
  const int64_t n = t * kTileN + warp;
  if (n < a.N) {
    for (int m = 0; m < M; ++m) {
      float s = 0.0f;
      for (int wi = 0; wi < kWarps; ++wi) s += red[wi][m][warp];
      float lora, sparse;
      epi.lane_part(x, K, m, n, lane, LdDevice{}, lora, sparse);
      PYHAPPY_UNROLL
      for (int st = 0; st < kEpiStages; ++st) {
        lora += __shfl_xor_sync(0xffffffffu, lora, 16 >> st);
        sparse += __shfl_xor_sync(0xffffffffu, sparse, 16 >> st);
      }
      if (lane == 0) store(y + m * a.N + n, epi.finish(s, n, lora, sparse, LdDevice{}));
    }
  }
}

template <int FMT, typename T>
void launch_fmt(const QuantDecodeArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.N + kTileN - 1) / kTileN)), block(kWarps * 32);
  if (a.M <= 1) {
    quant_decode_kernel<FMT, 1, T><<<grid, block, 0, stream>>>(a);
  } else if (a.M <= 2) {
    quant_decode_kernel<FMT, 2, T><<<grid, block, 0, stream>>>(a);
  } else if (a.M <= 4) {
    quant_decode_kernel<FMT, 4, T><<<grid, block, 0, stream>>>(a);
  } else if (a.M <= 8) {
    quant_decode_kernel<FMT, 8, T><<<grid, block, 0, stream>>>(a);
  } else {
    quant_decode_kernel<FMT, 16, T><<<grid, block, 0, stream>>>(a);
  }
}

template <typename T>
void launch_type(const QuantDecodeArgs& a, cudaStream_t stream) {
  if (a.fmt == kFmtNF4) {
    launch_fmt<kFmtNF4, T>(a, stream);
  } else if (a.fmt == kFmtInt4) {
    launch_fmt<kFmtInt4, T>(a, stream);
  } else {
    launch_fmt<kFmtInt3, T>(a, stream);
  }
}

}  // namespace

const char* launch_quant_decode(const QuantDecodeArgs& a, void* stream) {
  if (a.M < 1 || a.M > kDecodeMaxM) return "x must have 1 to 16 rows (M) for the decode kernel";
  if (a.fmt < kFmtNF4 || a.fmt > kFmtInt3) return "fmt must be 0 (nf4), 1 (int4) or 2 (int3)";
  if (a.K < kBlockK || a.K % kBlockK) return "K must be a positive multiple of 32";
  if (a.group_size < kBlockK || a.group_size % kBlockK || a.K % a.group_size)
    return "group_size must be a multiple of 32 dividing K";
  if (a.N < 1 || (a.N + kTileN - 1) / kTileN > 0x7fffffff) return "N must be in [1, 2^34)";
  if (reinterpret_cast<uintptr_t>(a.x) % 16 || reinterpret_cast<uintptr_t>(a.qdata) % 16)
    return "x and qdata must be 16-byte aligned";
  if ((a.lora_v == nullptr) != (a.lora_B == nullptr)) return "lora_v and lora_B must be given together";
  if ((a.row_ptr == nullptr) != (a.values == nullptr) || (a.row_ptr == nullptr) != (a.cols == nullptr))
    return "the sparse delta needs row_ptr, cols and values together";
  auto s = static_cast<cudaStream_t>(stream);
  if (a.dtype == DType::kHalf) {
    launch_type<__half>(a, s);
  } else if (a.dtype == DType::kBFloat16) {
    launch_type<__nv_bfloat16>(a, s);
  } else {
    return "x must be float16 or bfloat16 for the CUDA decode kernel";
  }
  return nullptr;
}

}  // namespace cuda
}  // namespace pyhappy
