// pyhappy::quant_decode — the CUDA decode kernel of quant_linear (csrc/cuda/quant_linear.cu), and on
// CPU tensors its lane-by-lane emulation: every (CTA, warp, lane) runs the kernel's own per-lane
// code from csrc/quant_linear_common.h (geometry, unpacking, per-group arithmetic), the warp
// butterfly is replayed in the order __shfl_xor_sync adds, the warps are summed in warp order and
// the shared epilogue runs once per output element. The CPU test suite checks this against the
// reference, so the arithmetic the GPU runs is tested on machines without one. It is a test
// vehicle, not a CPU kernel: quant_linear's CPU decode path is the AVX2 kernel in quant_linear.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>

#include "quant_decode_args.h"
#include "quant_linear_common.h"
#include "cpu/parallel.h"

namespace pyhappy {
namespace cpu {
namespace {

using namespace pyhappy::quant;

struct LdHost {
  template <typename T>
  float operator()(const T* p, int64_t i) const {
    return static_cast<float>(p[i]);
  }
};

template <int FMT, int MB, typename T>
void emulate_tile(const cuda::QuantDecodeArgs& a, int64_t t, const float* nf4) {
  constexpr int R = rows_per_lane(FMT), KL = k_per_lane(FMT), BB = block_bytes(FMT);
  const int64_t K = a.K, KB = K / kBlockK, G = K / a.group_size, bpg = a.group_size / kBlockK;
  const int M = static_cast<int>(a.M);
  const T* x = static_cast<const T*>(a.x);
  const uint8_t* tile = a.qdata + block_offset(t, 0, KB, BB);  // its blocks block_stride(FMT) apart
  const int64_t steps = num_steps(FMT, KB);

  float red[kWarps][MB][kTileN] = {};
  for (int warp = 0; warp < kWarps; ++warp) {
    float acc[32][MB][R] = {};
    for (int lane = 0; lane < 32; ++lane) {
      for (int64_t step = warp; step < steps; step += kWarps) {
        const Lane g = lane_geometry(FMT, step, lane);
        if (g.block >= KB) continue;
        const uint8_t* blk = tile + g.block * block_stride(FMT);
        uint32_t w[8] = {0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u};
        for (int i = 0; i < 4; ++i) w[i] = load_word(blk + g.byte0 + 4 * i);
        if (FMT == kFmtInt3) {
          for (int i = 0; i < 4; ++i) w[4 + i] = load_word(blk + g.byte1 + 4 * i);
        }
        float c[R][KL];
        lane_codes<FMT>(w, g, nf4, c);
        const int64_t grp = g.block / bpg;
        float sc[R], zr[R];
        for (int i = 0; i < R; ++i) {
          const int64_t pi = param_index(t, G, grp, g.row0 + i);
          sc[i] = FMT == kFmtNF4 ? static_cast<const float*>(a.scales)[pi]
                                 : static_cast<float>(static_cast<const at::Half*>(a.scales)[pi]);
          zr[i] = FMT == kFmtNF4 ? 0.0f : static_cast<float>(a.zeros[pi]);
        }
        const T* xk = x + g.block * kBlockK + g.k0;
        for (int m = 0; m < M; ++m) {
          float xm[KL];
          for (int k = 0; k < KL; ++k) xm[k] = static_cast<float>(xk[m * K + k]);
          lane_row<FMT>(c, xm, sc, zr, acc[lane][m]);
        }
      }
    }
    // acc[lane] += shfl_xor(acc, mask): every lane adds its partner's value from before the stage.
    for (int s = 0; s < butterfly_stages(FMT); ++s) {
      float before[32][MB][R];
      std::memcpy(before, acc, sizeof(acc));
      for (int lane = 0; lane < 32; ++lane) {
        for (int m = 0; m < MB; ++m) {
          for (int i = 0; i < R; ++i) acc[lane][m][i] = before[lane][m][i] + before[lane ^ butterfly_mask(s)][m][i];
        }
      }
    }
    for (int lane = 0; lane < holder_lanes(FMT); ++lane) {
      const int row0 = lane_geometry(FMT, 0, lane).row0;
      for (int m = 0; m < MB; ++m) {
        for (int i = 0; i < R; ++i) red[warp][m][row0 + i] = acc[lane][m][i];
      }
    }
  }

  // Warp w finishes row 8t + w: partials in warp order, the epilogue's lane partials butterflied
  // over masks 16..1 as __shfl_xor_sync adds them, lane 0's result stored.
  const Epilogue<T, LdHost> epi{static_cast<const T*>(a.bias), a.lora_v, static_cast<const T*>(a.lora_B), a.r,
                                a.row_ptr, a.cols, static_cast<const T*>(a.values), a.sparse_scale};
  T* y = static_cast<T*>(a.y);
  for (int warp = 0; warp < kWarps; ++warp) {
    const int64_t n = t * kTileN + warp;
    if (n >= a.N) continue;
    for (int m = 0; m < M; ++m) {
      float s = 0.0f;
      for (int wi = 0; wi < kWarps; ++wi) s += red[wi][m][warp];
      float lora[32], sparse[32];
      for (int lane = 0; lane < 32; ++lane) epi.lane_part(x, K, m, n, lane, LdHost{}, lora[lane], sparse[lane]);
      for (int st = 0; st < kEpiStages; ++st) {
        float lb[32], sb[32];
        std::memcpy(lb, lora, sizeof(lora));
        std::memcpy(sb, sparse, sizeof(sparse));
        for (int lane = 0; lane < 32; ++lane) {
          lora[lane] = lb[lane] + lb[lane ^ (16 >> st)];
          sparse[lane] = sb[lane] + sb[lane ^ (16 >> st)];
        }
      }
      y[m * a.N + n] = static_cast<T>(epi.finish(s, n, lora[0], sparse[0], LdHost{}));
    }
  }
}

template <int FMT, typename T>
void emulate_fmt(const cuda::QuantDecodeArgs& a) {
  static constexpr float nf4[16] = PYHAPPY_NF4_TABLE;
  const int64_t N8 = (a.N + kTileN - 1) / kTileN;
  // The same MB buckets as the CUDA launcher (launch_fmt).
  auto run = [&](auto mb) {
    cpu::parallel_for(0, N8, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) emulate_tile<FMT, decltype(mb)::value, T>(a, t, nf4);
    });
  };
  if (a.M <= 1) {
    run(std::integral_constant<int, 1>{});
  } else if (a.M <= 2) {
    run(std::integral_constant<int, 2>{});
  } else if (a.M <= 4) {
    run(std::integral_constant<int, 4>{});
  } else if (a.M <= 8) {
    run(std::integral_constant<int, 8>{});
  } else {
    run(std::integral_constant<int, 16>{});
  }
}

template <typename T>
void emulate(const cuda::QuantDecodeArgs& a) {
  if (a.fmt == kFmtNF4) {
    emulate_fmt<kFmtNF4, T>(a);
  } else if (a.fmt == kFmtInt4) {
    emulate_fmt<kFmtInt4, T>(a);
  } else {
    emulate_fmt<kFmtInt3, T>(a);
  }
}

}  // namespace

at::Tensor quant_decode_cpu(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                            const std::optional<at::Tensor>& zeros, int64_t fmt, int64_t N, int64_t group_size,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lora_v,
                            const std::optional<at::Tensor>& lora_B, const std::optional<at::Tensor>& sparse_layout,
                            const std::optional<at::Tensor>& sparse_values, double sparse_scale) {
  const char* op = "quant_decode";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got ", x.dim(), "-D");
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  const auto a = make_decode_args(op, x, y, qdata, scales, zeros, fmt, N, group_size, bias, lora_v, lora_B,
                                  sparse_layout, sparse_values, sparse_scale);
  if (a.dtype == cuda::DType::kHalf) {
    emulate<at::Half>(a);
  } else if (a.dtype == cuda::DType::kBFloat16) {
    emulate<at::BFloat16>(a);
  } else {
    emulate<float>(a);
  }
  return y;
}

}  // namespace cpu
}  // namespace pyhappy

TORCH_LIBRARY_FRAGMENT(pyhappy, m) {
  m.def(
      "quant_decode(Tensor x, Tensor qdata, Tensor scales, Tensor? zeros, int fmt, int N, int group_size, "
      "Tensor? bias, Tensor? lora_v, Tensor? lora_B, Tensor? sparse_layout, Tensor? sparse_values, "
      "float sparse_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyhappy, CPU, m) { m.impl("quant_decode", &pyhappy::cpu::quant_decode_cpu); }
