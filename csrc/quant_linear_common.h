// The per-element logic of pyhappy::quant_linear, shared by the C++ CPU kernels
// (csrc/cpu/quant_linear.cpp), the CUDA decode kernel (csrc/cuda/quant_linear.cu) and that kernel's
// lane-by-lane CPU emulation (csrc/cpu/quant_linear_lanes.cpp), so the CPU test suite runs the same
// index math, unpacking and operation order as the GPU (not bit for bit: nvcc contracts a·b + c into
// FMAs and --use_fast_math flushes subnormals; tests compare with rounding-error tolerances).
// Header-only, __host__ __device__, no CUDA intrinsics, no torch.
//
// Packed layout (pyhappy/quant/layout.py): rows in tiles of 8, K in blocks of 32, tiles in pairs
// (2p, 2p + 1) whose blocks alternate in memory: qdata [N8 / 2, KB, 2 · BB], block b of tile t at
// byte block_offset(t, b) (one sequential stream for a kernel that decodes a pair side by side).
// N8 (tile_count) is even: N is padded to a multiple of 16 with rows that dequantize to 0.
//   4-bit block (128 bytes): little-endian word (s, r) = bytes [32s + 4r, 32s + 4r + 4) holds row r,
//     k = 8s + j (j < 8): byte j & 3, low nibble for j < 4, high nibble for j >= 4.
//   3-bit block (96 bytes): three 32-byte vectors; word (v, r) = bytes [32v + 4r, +4). Byte kk of
//     words (0, r), (1, r), (2, r) form u = b0 | b1 << 8 | b2 << 16, and code(r, 4i + kk) = bits
//     3i .. 3i+2 of u (i < 8).
//   Per-group parameters [N8, G, 8]: w = (code - zero) · scale (int4/int3), NF4[code] · absmax (nf4).
//
// The CUDA decode kernel's thread mapping, defined here so the emulation follows it exactly:
//   one CTA per 8-row tile, kWarps (= 8) warps splitting K by "steps"; a warp step covers 4 blocks
//   (4-bit: 512 contiguous bytes, 3-bit: 384), each lane 4 rows x 8 k of one block (lane_geometry).
//   Lanes that share l%2 hold the same rows: a butterfly over lane masks 16, 8, 4, 2 leaves lane 0
//   with rows 0..3 and lane 1 with rows 4..7. Then warp w finishes row 8t + w: the warps' partial
//   sums added in warp order, and the epilogue (bias, LoRA, sparse delta) split across its lanes.
#pragma once

#include <cstdint>

#include "dropout_hash.h"  // PYHAPPY_HD

#if defined(__CUDA_ARCH__)
#define PYHAPPY_UNROLL _Pragma("unroll")
#elif defined(__CUDACC__)
#define PYHAPPY_UNROLL  // nvcc's host pass: the host compiler never runs these loops hot
#else
#define PYHAPPY_UNROLL _Pragma("GCC unroll 16")
#endif

namespace pyhappy {
namespace quant {

constexpr int kTileN = 8;
constexpr int kBlockK = 32;
constexpr int kFmtNF4 = 0, kFmtInt4 = 1, kFmtInt3 = 2;
constexpr int kDecodeMaxM = 16;  // rows of x the decode kernels take in one pass over the weight
constexpr int kWarps = 8;        // warps per CTA of the CUDA decode kernel (K split)

// bitsandbytes' NF4 code table, exactly as it stores it.
#define PYHAPPY_NF4_TABLE                                                                                       \
  {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,           \
   -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,           \
   0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,                    \
   0.7229568362236023f, 1.0f}

PYHAPPY_HD constexpr int bits_of(int fmt) { return fmt == kFmtInt3 ? 3 : 4; }
PYHAPPY_HD constexpr int block_bytes(int fmt) { return fmt == kFmtInt3 ? 96 : 128; }
// Bytes from one block of a tile to its next (the pair's other tile's block lies between).
PYHAPPY_HD constexpr int block_stride(int fmt) { return 2 * block_bytes(fmt); }
// Tiles of an N-row weight: N padded to a multiple of 16 (a whole number of tile pairs).
PYHAPPY_HD constexpr int64_t tile_count(int64_t N) { return 2 * ((N + 2 * kTileN - 1) / (2 * kTileN)); }
// Byte offset of block b of tile t in qdata (KB blocks per tile row, bb bytes per block).
PYHAPPY_HD constexpr int64_t block_offset(int64_t t, int64_t b, int64_t KB, int64_t bb) {
  return (((t >> 1) * KB + b) * 2 + (t & 1)) * bb;
}

// ---- codes ------------------------------------------------------------------------------------

PYHAPPY_HD uint32_t load_word(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16) |
         (static_cast<uint32_t>(p[3]) << 24);
}

// 4-bit: code of row r, k = 8s + j, from word (s, r).
PYHAPPY_HD uint32_t code4(uint32_t word, int j) { return (word >> (8 * (j & 3) + 4 * (j >> 2))) & 15u; }

// 3-bit: the code at bits shift .. shift+2 of the 16-bit value (byte kk of lo) | (byte kk of hi) << 8,
// lo and hi a row's words of the vectors holding bit 3i and bit 3i + 2 of u (see the layout above).
PYHAPPY_HD uint32_t code3(uint32_t lo, uint32_t hi, int shift, int kk) {
  return ((((lo >> (8 * kk)) & 255u) | (((hi >> (8 * kk)) & 255u) << 8)) >> shift) & 7u;
}

// Code of row r, k (< 32) of one packed block.
PYHAPPY_HD uint32_t block_code(const uint8_t* blk, int bits, int r, int k) {
  if (bits == 4) return code4(load_word(blk + 32 * (k >> 3) + 4 * r), k & 7);
  const int b0 = 3 * (k >> 2);  // u's first bit of this code
  return code3(load_word(blk + 32 * (b0 >> 3) + 4 * r), load_word(blk + 32 * ((b0 + 2) >> 3) + 4 * r), b0 & 7, k & 3);
}

// ---- values -----------------------------------------------------------------------------------

// The weight's value: (code - zero) · scale, or NF4[code] · absmax (nf4: zero unused).
PYHAPPY_HD float dequant(int fmt, uint32_t code, float scale, float zero, const float* nf4) {
  return fmt == kFmtNF4 ? nf4[code] * scale : (static_cast<float>(code) - zero) * scale;
}

// What a code contributes to a raw dot product with the activations; the group's scale and zero
// are applied once per block by block_combine (Σ (c - z)·s·x = s·(Σ c·x - z·Σ x)).
PYHAPPY_HD float dot_code(int fmt, uint32_t code, const float* nf4) {
  return fmt == kFmtNF4 ? nf4[code] : static_cast<float>(code);
}

PYHAPPY_HD float block_combine(int fmt, float dot, float xsum, float scale, float zero) {
  return fmt == kFmtNF4 ? scale * dot : scale * (dot - zero * xsum);
}

// Index of the parameter of row r of tile t, group g in [N8, G, 8].
PYHAPPY_HD int64_t param_index(int64_t t, int64_t G, int64_t g, int r) { return (t * G + g) * kTileN + r; }

// ---- the decode kernel's lane geometry ----------------------------------------------------------

// Both widths use one geometry: a warp step covers 4 blocks, each lane 4 rows x 8 k of one block,
// so a lane's activations serve 4 rows and the butterfly is the same. A lane's weight bytes are
// 16-byte aligned: 4-bit blocks are 128 bytes, 3-bit blocks 96 (both multiples of 16).
PYHAPPY_HD constexpr int blocks_per_step(int) { return 4; }
PYHAPPY_HD constexpr int rows_per_lane(int) { return 4; }
PYHAPPY_HD constexpr int k_per_lane(int) { return 8; }
// Lanes left holding a tile's rows after the butterfly (lane 0: rows 0..3, lane 1: rows 4..7), and the
// butterfly's masks (every lane bit but bit 0, which selects the rows).
PYHAPPY_HD constexpr int holder_lanes(int) { return 2; }
PYHAPPY_HD constexpr int butterfly_stages(int) { return 4; }
PYHAPPY_HD constexpr int butterfly_mask(int stage) { return 16 >> stage; }

PYHAPPY_HD int64_t num_steps(int fmt, int64_t KB) { return (KB + blocks_per_step(fmt) - 1) / blocks_per_step(fmt); }

struct Lane {
  int64_t block;  // block index along K
  int row0;       // first of the 4 rows (in the tile) this lane holds
  int k0;         // first of its 8 k within the block
  int byte0;      // offset of its 16 code bytes in the block (3-bit: the 4 words of the vector
                  // holding u's first bit of its codes)
  int byte1;      // 3-bit: the 4 words of the vector holding their last bit; unused for 4-bit
  int shift;      // 3-bit: where its first code starts in (byte0's byte | byte1's byte << 8)
};

// 4-bit lane l: block 4·step + l/8, q = l%8: bytes 16q .. 16q+15 = words 4q .. 4q+3, i.e.
//   s = q/2 (k = 8s .. 8s+7) and rows 4(q%2) + i, i < 4.
// 3-bit lane l: block 4·step + l/8, p = l%2 (rows 4p .. 4p+3), q = (l/2)%4: k = 8q .. 8q+7, the
//   codes at bits 6q .. 6q+5 of u: words (6q/8, 4p .. 4p+3) and ((6q+5)/8, 4p .. 4p+3) (the same
//   vector for q = 0 and 3), from bit 6q%8.
PYHAPPY_HD Lane lane_geometry(int fmt, int64_t step, int lane) {
  Lane g;
  g.block = 4 * step + (lane >> 3);
  g.row0 = 4 * (lane & 1);
  if (fmt == kFmtInt3) {
    const int q = (lane >> 1) & 3, b0 = 6 * q;
    g.k0 = 8 * q;
    g.byte0 = 32 * (b0 >> 3) + 16 * (lane & 1);
    g.byte1 = 32 * ((b0 + 5) >> 3) + 16 * (lane & 1);
    g.shift = b0 & 7;
  } else {
    const int q = lane & 7;
    g.k0 = 8 * (q >> 1);
    g.byte0 = 16 * q;
    g.byte1 = g.shift = 0;
  }
  return g;
}

// One lane's work on one block, after its loads, in two parts so the activation rows stream
// through registers one at a time (at 16 rows, all of them would not fit).
// lane_codes: w[] the lane's words, word i for row row0 + i (3-bit: w[0..3] at byte0, w[4..7] at
// byte1) -> c[i][k], code values ready for the dot product.
template <int FMT>
PYHAPPY_HD void lane_codes(const uint32_t* w, const Lane& g, const float* nf4,
                           float (&c)[rows_per_lane(FMT)][k_per_lane(FMT)]) {
  PYHAPPY_UNROLL
  for (int i = 0; i < rows_per_lane(FMT); ++i) {
    PYHAPPY_UNROLL
    for (int k = 0; k < k_per_lane(FMT); ++k) {
      const uint32_t code = FMT == kFmtInt3 ? code3(w[i], w[4 + i], g.shift + 3 * (k >> 2), k & 3) : code4(w[i], k);
      c[i][k] = dot_code(FMT, code, nf4);
    }
  }
}

// lane_row: one activation row's k_per_lane values xm against the lane's codes;
// acc[i] += block_combine(Σ_k c[i][k] · xm[k], Σ_k xm[k]) with the group parameters sc/zr of row i.
template <int FMT>
PYHAPPY_HD void lane_row(const float (&c)[rows_per_lane(FMT)][k_per_lane(FMT)], const float* xm, const float* sc,
                         const float* zr, float* acc) {
  float xs = 0.0f;
  PYHAPPY_UNROLL
  for (int k = 0; k < k_per_lane(FMT); ++k) xs += xm[k];
  PYHAPPY_UNROLL
  for (int i = 0; i < rows_per_lane(FMT); ++i) {
    float d = 0.0f;
    PYHAPPY_UNROLL
    for (int k = 0; k < k_per_lane(FMT); ++k) d += c[i][k] * xm[k];
    acc[i] += block_combine(FMT, d, xs, sc[i], zr[i]);
  }
}

// ---- epilogue ------------------------------------------------------------------------------------

// Everything the decode kernels add to x · deq(W)ᵀ, per output element (m, n). Pointers may be
// null for absent terms. lora_v [M, r] float32 = s · ((dropout(x) Aᵀ) Cᵀ) precomputed; lora_B
// [N, r]; the sparse delta as CSR (row_ptr [N+1], cols [nnz]) with values [nnz], times sparse_scale.
// Ld(p, i) reads p[i] as float (the caller's element type). The dot products over r and over the
// CSR row are split across the 32 lanes of a warp (lane_part: lane j takes entries j, j+32, ...;
// consecutive lanes read consecutive entries), the partials summed by a butterfly over masks 16..1,
// then finish adds them once.
constexpr int kEpiStages = 5;

template <typename T, typename Ld>
struct Epilogue {
  const T* bias;
  const float* lora_v;
  const T* lora_B;
  int64_t r;
  const int32_t* row_ptr;
  const int32_t* cols;
  const T* values;
  float sparse_scale;

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
  PYHAPPY_HD void lane_part(const T* x, int64_t K, int64_t m, int64_t n, int lane, Ld ld, float& lora,
                            float& sparse) const {
    lora = 0.0f;
    sparse = 0.0f;
    if (lora_v != nullptr) {
      for (int64_t j = lane; j < r; j += 32) lora += lora_v[m * r + j] * ld(lora_B, n * r + j);
    }
    if (row_ptr != nullptr) {
      for (int32_t p = row_ptr[n] + lane; p < row_ptr[n + 1]; p += 32) sparse += ld(values, p) * ld(x, m * K + cols[p]);
    }
  }

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
  PYHAPPY_HD float finish(float acc, int64_t n, float lora, float sparse, Ld ld) const {
    float y = acc;
    if (bias != nullptr) y += ld(bias, n);
    if (lora_v != nullptr) y += lora;
    if (row_ptr != nullptr) y += sparse_scale * sparse;
    return y;
  }
};

}  // namespace quant
}  // namespace pyhappy
