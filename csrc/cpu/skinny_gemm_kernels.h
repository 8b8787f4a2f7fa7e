// The skinny-product kernels of skinny_gemm.cpp, written once over a vector type V and compiled
// twice there (inside `#pragma GCC target` regions): V = 8 fp32 lanes (AVX2+FMA) and V = 16 lanes
// (AVX-512F). Included only from skinny_gemm.cpp, inside a namespace that defines V and after
// load_row / round_up.
//
// Everything works on 16-column blocks (kVecs = 16 / V::W vectors) of the small operand, padded
// with zeros to RP = a multiple of 16. Register blocking: kRows rows (or result columns) x kVecs
// vectors of accumulators (V::kRows): AVX2 6 x 2 = 12 ymm, plus 2 operand vectors and 1 broadcast:
// 15 of its 16 registers (4 x 2 leaves the two FMA pipes waiting on the FMA latency; 8 x 2 spills).
// AVX-512 8 x 1 zmm with the broadcasts folded into the FMAs (12 x 1 is slower; see
// benchmarks/README.md, "Design measurements", "Skinny kernels: register blocking and inlining").
constexpr int kVecs = 16 / V::W;
constexpr int kRows = V::kRows;
constexpr int kPanel = 48;  // columns of X per packed panel in gt_x: a multiple of kRows for both widths
static_assert(kPanel % kRows == 0, "kPanel must be a multiple of kRows");

// The two long-loop kernels (rows_dot, panel_dot) are compiled inline for AVX2 and out of line
// for AVX-512 (PYHAPPY_SKINNY_INNER, set by the includer): with g++ 12 the other choice keeps the
// accumulator array in memory, storing every accumulator on each iteration, markedly slower
// (same section of benchmarks/README.md). rows_p16 (a loop of r) is inline for both.

// res[i, W·v ...] = Σ_k x_i[k] · Pt[k, W·v : W·v + W] for kRows rows and 16 packed columns.
// The sums live in a local array with constant indices only, so they stay in registers; they are
// stored to res [kRows, 16] once at the end (callers index it at run time).
PYHAPPY_SKINNY_INNER void rows_dot(const float* const* xr, int64_t D, const float* Pt, int64_t ldpt,
                     float* res) {
  typename V::T a[kRows][kVecs];
  for (int i = 0; i < kRows; ++i)
    for (int v = 0; v < kVecs; ++v) a[i][v] = V::zero();
  for (int64_t k = 0; k < D; ++k) {
    typename V::T pv[kVecs];
    for (int v = 0; v < kVecs; ++v) pv[v] = V::load(Pt + k * ldpt + V::W * v);
    for (int i = 0; i < kRows; ++i) {
      const typename V::T xb = V::bcast(xr[i] + k);
      for (int v = 0; v < kVecs; ++v) a[i][v] = V::fma(xb, pv[v], a[i][v]);
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int v = 0; v < kVecs; ++v) V::store(res + i * 16 + V::W * v, a[i][v]);
}

// res[c, W·v ...] = Σ_m xb[m, c] · g[m, W·v : W·v + W] for kRows columns of a packed panel (row stride
// kPanel) and 16 rank columns of packed G (row stride RP): the columns of the result are
// broadcast and the ranks are the vector lanes, so one pass over the panel serves 16 ranks.
PYHAPPY_SKINNY_INNER void panel_dot(const float* Gp, int64_t RP, const float* xb, int64_t M, float* res) {
  typename V::T a[kRows][kVecs];
  for (int c = 0; c < kRows; ++c)
    for (int v = 0; v < kVecs; ++v) a[c][v] = V::zero();
  for (int64_t m = 0; m < M; ++m) {
    typename V::T gv[kVecs];
    for (int v = 0; v < kVecs; ++v) gv[v] = V::load(Gp + m * RP + V::W * v);
    const float* x = xb + m * kPanel;
    for (int c = 0; c < kRows; ++c) {
      const typename V::T xv = V::bcast(x + c);
      for (int v = 0; v < kVecs; ++v) a[c][v] = V::fma(xv, gv[v], a[c][v]);
    }
  }
  for (int c = 0; c < kRows; ++c)
    for (int v = 0; v < kVecs; ++v) V::store(res + c * 16 + V::W * v, a[c][v]);
}

// res[i, W·v ...] = Σ_j g_i[j] · P[j, c + W·v : c + W·v + W] for kRows rows of G and 16 columns of P.
inline void rows_p16(const float* const* gr, int64_t r, const float* P, int64_t ldp, int64_t c,
                     float* res) {
  typename V::T a[kRows][kVecs];
  for (int i = 0; i < kRows; ++i)
    for (int v = 0; v < kVecs; ++v) a[i][v] = V::zero();
  for (int64_t j = 0; j < r; ++j) {
    typename V::T pv[kVecs];
    for (int v = 0; v < kVecs; ++v) pv[v] = V::load(P + j * ldp + c + V::W * v);
    for (int i = 0; i < kRows; ++i) {
      const typename V::T gb = V::bcast(gr[i] + j);
      for (int v = 0; v < kVecs; ++v) a[i][v] = V::fma(gb, pv[v], a[i][v]);
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int v = 0; v < kVecs; ++v) V::store(res + i * 16 + V::W * v, a[i][v]);
}

// Rows [kRows*g0, kRows*g1) of x_pt; Pt is Pᵀ packed [D, RP].
void x_pt_groups(const float* X, int64_t ldx, const int64_t* rows, int64_t M, int64_t D, const float* Pt, int64_t RP,
                 int64_t r, float alpha, const Dropout& drop, float* out, int64_t g0, int64_t g1) {
  std::vector<float> xbuf(drop.active ? static_cast<size_t>(kRows * D) : 0);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t m0 = g * kRows, nr = std::min<int64_t>(kRows, M - m0);
    const float* xr[kRows];
    for (int i = 0; i < kRows; ++i) {
      const int64_t ii = std::min<int64_t>(i, nr - 1);  // short group: repeat the last row, discard it
      const int64_t row = rows ? rows[m0 + ii] : m0 + ii;
      if (drop.active) {
        if (i < nr) load_row(X + row * ldx, D, row, 0, drop, xbuf.data() + i * D);
        xr[i] = xbuf.data() + ii * D;
      } else {
        xr[i] = X + row * ldx;
      }
    }
    for (int64_t c = 0; c < RP; c += 16) {
      alignas(64) float res[kRows * 16];
      rows_dot(xr, D, Pt + c, RP, res);
      const int64_t n = std::min<int64_t>(16, r - c);
      for (int64_t i = 0; i < nr; ++i)
        for (int64_t j = 0; j < n; ++j) out[(m0 + i) * r + c + j] = res[i * 16 + j] * alpha;
    }
  }
}

// Column panels [kPanel*b0, kPanel*b1) of gt_x; Gp is G packed [M, RP].
void gt_x_panels(const float* Gp, int64_t RP, int64_t r, const float* X, int64_t ldx, const int64_t* rows, int64_t M,
                 int64_t D, float alpha, const Dropout& drop, float* out, int64_t ldo, int64_t b0, int64_t b1) {
  std::vector<float> xb(static_cast<size_t>(std::max<int64_t>(M, 1) * kPanel), 0.0f);  // [M, kPanel] panel
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t c0 = b * kPanel, nc = std::min<int64_t>(kPanel, D - c0);
    for (int64_t m = 0; m < M; ++m) {
      const int64_t row = rows ? rows[m] : m;
      load_row(X + row * ldx + c0, nc, row, c0, drop, xb.data() + m * kPanel);
    }
    for (int64_t j0 = 0; j0 < RP; j0 += 16) {
      const int64_t nj = std::min<int64_t>(16, r - j0);
      for (int64_t cb = 0; cb < nc; cb += kRows) {  // columns past nc hold stale data: computed, not stored
        alignas(64) float res[kRows * 16];
        panel_dot(Gp + j0, RP, xb.data() + cb, M, res);
        for (int64_t c = 0; c < kRows && cb + c < nc; ++c) {
          float* o = out + j0 * ldo + c0 + cb + c;
          for (int64_t jj = 0; jj < nj; ++jj) o[jj * ldo] = res[c * 16 + jj] * alpha;
        }
      }
    }
  }
}

// Rows [kRows*g0, kRows*g1) of g_p.
void g_p_groups(const float* G, int64_t ldg, int64_t M, int64_t r, const float* P, int64_t ldp, int64_t D,
                const float* bias, float alpha, const Dropout& drop, bool accumulate, float* out, int64_t ldo,
                int64_t col0, int64_t g0, int64_t g1) {
  const int64_t D16 = D / 16 * 16;
  const typename V::T va = V::set1(alpha);
  const typename V::T vs = V::set1(drop.scale);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t m0 = g * kRows, nr = std::min<int64_t>(kRows, M - m0);
    const float* gr[kRows];
    uint32_t keys[kRows];
    for (int i = 0; i < kRows; ++i) {
      const int64_t m = m0 + std::min<int64_t>(i, nr - 1);
      gr[i] = G + m * ldg;
      keys[i] = dropout_row_key(drop.seed, static_cast<uint32_t>(m));
    }
    for (int64_t c = 0; c < D16; c += 16) {
      alignas(64) float res[kRows * 16];
      rows_p16(gr, r, P, ldp, c, res);
      for (int64_t i = 0; i < nr; ++i) {
        for (int v = 0; v < kVecs; ++v) {
          const int64_t cc = c + V::W * v;
          typename V::T y = V::fma(V::load(res + i * 16 + V::W * v), va, bias ? V::load(bias + cc) : V::zero());
          if (drop.active) {
            y = V::and_(V::mul(y, vs), V::keep(keys[i], static_cast<uint32_t>(col0 + cc), drop.threshold));
          }
          float* o = out + (m0 + i) * ldo + cc;
          V::store(o, accumulate ? V::add(V::load(o), y) : y);
        }
      }
    }
    for (int64_t i = 0; i < nr; ++i) {  // column tail
      for (int64_t c = D16; c < D; ++c) {
        float acc = 0.0f;
        for (int64_t j = 0; j < r; ++j) acc += gr[i][j] * P[j * ldp + c];
        float v = acc * alpha + (bias ? bias[c] : 0.0f);
        if (drop.active) {
          v = dropout_keep(keys[i], static_cast<uint32_t>(col0 + c), drop.threshold) ? v * drop.scale : 0.0f;
        }
        out[(m0 + i) * ldo + c] = accumulate ? out[(m0 + i) * ldo + c] + v : v;
      }
    }
  }
}
