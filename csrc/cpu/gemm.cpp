#include "cpu/gemm.h"

#include "cpu/cpu_features.h"
#include "cpu/gemv.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>

namespace pyhappy {
namespace cpu {
namespace gemm {
namespace {

// The index of name in names (an enum's values in order); std::invalid_argument saying `expected`
// otherwise.
template <size_t N>
int choice(const char* name, const char* const (&names)[N], const char* expected) {
  for (size_t i = 0; i < N; ++i)
    if (std::strcmp(name, names[i]) == 0) return static_cast<int>(i);
  throw std::invalid_argument(std::string(expected) + ", got '" + name + "'");
}

enum class Mode { kAuto = 0, kFp32 = 1, kNative = 2 };
constexpr const char* kModeNames[] = {"auto", "fp32", "native"};

Mode parse(const char* name) {
  return static_cast<Mode>(choice(name, kModeNames, "set_lowp_gemm: mode must be 'auto', 'fp32' or 'native'"));
}

std::atomic<int>& mode_ref() {
  static std::atomic<int> m{env_choice("PYHAPPY_LOWP_GEMM", static_cast<int>(Mode::kAuto), parse)};
  return m;
}

// ---- fp32 products: ATen (MKL) or oneDNN ----------------------------------------------------------
// torch's fp32 at::mm is MKL, which on AMD CPUs runs its AVX2 code even where the CPU has AVX-512.
// torch also ships oneDNN (mkldnn::_linear_pointwise, what inductor's CPU fusions call), which
// dispatches on the ISA alone, so on an AVX-512 CPU it runs the forward (x·Wᵀ), backward (dy·W),
// skinny and decode products in well under MKL's time. Tiny products stay on ATen, where oneDNN's
// per-call overhead outweighs its faster kernel (kOnednnMinMacs). Layouts: a with unit column
// stride, b contiguous either way round (W or Wᵀ); others go to ATen (oneDNN is far slower on, e.g.,
// a row slice of a transposed weight).
// "auto" picks oneDNN where the CPU has AVX-512F and ATen elsewhere. The choice rests on an AMD
// Zen 5 alone: an Intel CPU's MKL has AVX-512 paths of its own, and on AVX2 CPUs MKL is the engine
// the blocking rules below were tuned with. Figures: benchmarks/README.md, "Design measurements",
// "fp32 GEMM engine".
enum class Engine { kAuto = 0, kAten = 1, kOnednn = 2 };
constexpr const char* kEngineNames[] = {"auto", "aten", "onednn"};

Engine parse_engine(const char* name, const char* who) {
  const std::string expected = std::string(who) + ": engine must be 'auto', 'aten' or 'onednn'";
  return static_cast<Engine>(choice(name, kEngineNames, expected.c_str()));
}

// The process-wide setting.
std::atomic<int>& engine_ref() {
  static std::atomic<int> e{env_choice("PYHAPPY_FP32_GEMM", static_cast<int>(Engine::kAuto),
                                       [](const char* v) { return parse_engine(v, "PYHAPPY_FP32_GEMM"); })};
  return e;
}

// This thread's override of it (kNoOverride: none), set by EngineScope.
constexpr int kNoOverride = -1;
thread_local int t_engine = kNoOverride;

// The setting in force on this thread.
Engine engine() {
  const int t = t_engine;
  return static_cast<Engine>(t != kNoOverride ? t : engine_ref().load(std::memory_order_relaxed));
}

// torch's oneDNN linear, or null where this torch was built without oneDNN.
const c10::OperatorHandle* onednn_linear() {
  static const std::optional<c10::OperatorHandle> h =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return h ? &*h : nullptr;
}

bool onednn_on() {
  const Engine e = engine();
  if (e == Engine::kAten || onednn_linear() == nullptr) return false;
  if (e == Engine::kOnednn) return true;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512;
#else
  return false;
#endif
}

constexpr int64_t kOnednnMinMacs = int64_t{1} << 20;

// Whether oneDNN serves the fp32 product a [M, K] · b [K, N].
// The same for an a of a's dtype and device, M rows and unit column stride (a_unit) or not.
bool onednn_rows(at::ScalarType a_type, bool a_cpu, int64_t M, bool a_unit, const at::Tensor& b) {
  if (a_type != at::kFloat || b.scalar_type() != at::kFloat || !a_cpu || !onednn_on()) return false;
  const int64_t K = b.size(0), N = b.size(1);
  if (M == 0 || K == 0 || N == 0 || M * K * N < kOnednnMinMacs) return false;
  if (!a_unit || !(b.is_contiguous() || b.t().is_contiguous())) return false;
  // One row against a row-major b (dy·W at decode) stays on MKL: its GEMV reads a row-major weight
  // faster than oneDNN's inner product does at one row; from two rows oneDNN is faster (see
  // benchmarks/README.md, "Design measurements", "fp32 GEMM engine").
  return !(M == 1 && b.stride(1) == 1 && N > 1);
}

bool onednn(const at::Tensor& a, const at::Tensor& b) {
  return onednn_rows(a.scalar_type(), a.device().is_cpu(), a.size(0), a.stride(1) == 1, b);
}

// a · b (+ bias [N]) by oneDNN's inner product: a new contiguous [M, N].
at::Tensor onednn_mm(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias = {}) {
  torch::jit::Stack s;
  s.reserve(6);
  s.emplace_back(a);
  s.emplace_back(b.t());  // the weight [N, K]
  s.emplace_back(bias);
  s.emplace_back(std::string("none"));
  s.emplace_back(c10::List<std::optional<at::Scalar>>());
  s.emplace_back(std::optional<std::string>(""));
  onednn_linear()->callBoxed(&s);
  return s[0].toTensor();
}

// Decode-sized products (a few rows against a weight) go to pyhappy's own streaming kernels
// (gemv.cpp) under the "auto" engine; "aten" and "onednn" send them to that engine like any other.
bool decode(const at::Tensor& a, const at::Tensor& b) {
  return engine() == Engine::kAuto && gemv::serves(a, b);
}

// a · b in fp32 (fp32 operands): oneDNN where it serves the product, else ATen.
at::Tensor fp32_mm(const at::Tensor& a, const at::Tensor& b) { return onednn(a, b) ? onednn_mm(a, b) : at::mm(a, b); }

// Native reduced-precision dot products of this CPU (what oneDNN's fast bf16 / fp16 GEMM needs).
struct Native {
  bool bf16 = false, fp16 = false;
};

const Native& native() {
  static const Native n = [] {
    Native r;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    r.bf16 = __builtin_cpu_supports("avx512bf16");
    r.fp16 = __builtin_cpu_supports("avx512fp16");
#else
    r.bf16 = r.fp16 = true;  // no x86 feature query: leave every product to ATen
#endif
    return r;
  }();
  return n;
}

// torch's slow path is slowest when b is row-major ([K, N], unit column stride: x·W for a weight
// W [K, N], dy·W): there the fp32 blocks are several times faster from one row on, so every such
// product goes through fp32. With b column-major (x·Wᵀ, the forward's layout) torch streams the
// weight well at decode sizes, where converting the weight costs more than the product saves: there
// the blocks serve products of at least kMinFlopsPerElem flops per operand element (2·M·N·K over
// M·K + K·N, about 2·min(M, N) for a skinny product: M=8 is 16), which puts the switch between 4 and
// 8 rows at K = N = 4096, where the two cross. Figures: benchmarks/README.md, "Design
// measurements", "bf16/fp16 products through fp32 blocks".
constexpr double kMinFlopsPerElem = 12.0;

// Elements of each column block of b converted to fp32 at a time (4 MiB, reused from cache by the
// GEMM); a's row blocks take 4x that (16 MiB), so a [512, 4096] activation is one block and the
// weight is converted once per call.
constexpr int64_t kBlockElems = int64_t{1} << 20;

// out (beta 0: =, 1: +=) alpha · a · b through fp32 blocks: a in row blocks, b in column blocks,
// each converted once per pass, the fp32 product rounded once into out.
void blocked(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, double alpha) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (beta == 0) out.zero_();
    return;
  }
  const int64_t mb = std::clamp<int64_t>(4 * kBlockElems / K, 1, M);
  const int64_t nb = std::clamp<int64_t>(kBlockElems / K / 16 * 16, 16, N);
  for (int64_t m0 = 0; m0 < M; m0 += mb) {
    const int64_t mc = std::min(mb, M - m0);
    const at::Tensor af = a.narrow(0, m0, mc).to(at::kFloat);
    for (int64_t n0 = 0; n0 < N; n0 += nb) {
      const int64_t nc = std::min(nb, N - n0);
      at::Tensor r = fp32_mm(af, b.narrow(1, n0, nc).to(at::kFloat));
      at::Tensor dst = out.narrow(0, m0, mc).narrow(1, n0, nc);
      if (beta == 0) {
        if (alpha != 1.0) r.mul_(alpha);
        dst.copy_(r);
      } else {
        dst.add_(r, alpha);  // computed in fp32 (the common dtype), rounded once into out
      }
    }
  }
}

bool lowp(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// fp32 products in column blocks. On an AVX2 CPU whose L3 is split per core complex (Zen 3), MKL
// runs x·Wᵀ and dy·W of LLM-sized shapes faster when b is cut into column blocks (each block of out
// written through its own strided view, no copies), so that a stays in L3 while one block of b
// streams past, than as one ATen call; the gain fades as a outgrows that L3, and the block width
// matters little (256 to 1024 columns alike). So: block while a fits in an L3 (at most kMaxAElems
// elements: 32 MiB of fp32, one Zen 3 CCX's L3; the OS reports the whole socket's cache, so this is
// a constant) and b is large (at least kMinBElems: 8 MiB), with blocks of b of ~8 MiB (at least 64
// columns), from 16 rows for the forward's layout and 64 for a row-major b (below that, blocking
// dy·W gains nothing). Figures: benchmarks/README.md, "Design measurements", "Column-blocked fp32
// products".
constexpr int64_t kMaxAElems = int64_t{8} << 20;
constexpr int64_t kMinBElems = int64_t{2} << 20;
constexpr int64_t kBlockBElems = int64_t{2} << 20;

}  // namespace

int64_t column_block(at::ScalarType t, int64_t M, int64_t K, int64_t N, bool b_col_major) {
  if (t != at::kFloat || M < (b_col_major ? 16 : 64) || M * K > kMaxAElems || K * N < kMinBElems) return 0;
  const int64_t nb = std::max<int64_t>(64, (kBlockBElems / K + 32) / 64 * 64);  // nearest multiple of 64
  return nb < N ? nb : 0;
}

bool via_fp32(at::ScalarType t, int64_t M, int64_t K, int64_t N, bool b_col_major) {
  if (!lowp(t)) return false;
  const Mode m = static_cast<Mode>(mode_ref().load(std::memory_order_relaxed));
  if (m != Mode::kAuto) return m == Mode::kFp32;
  if (t == at::kBFloat16 ? native().bf16 : native().fp16) return false;
  if (!b_col_major) return true;  // torch's slowest case
  const double elems = static_cast<double>(M) * K + static_cast<double>(K) * N;
  return elems > 0 && 2.0 * M * N * K >= kMinFlopsPerElem * elems;
}

namespace {
// b [K, N] laid out column-major (unit row stride: a transposed weight).
bool col_major(const at::Tensor& b) { return b.stride(0) == 1 && b.size(1) > 1; }

int64_t block_of(const at::Tensor& a, const at::Tensor& b) {
  return a.device().is_cpu() ? gemm::column_block(a.scalar_type(), a.size(0), a.size(1), b.size(1), col_major(b))
                             : 0;
}
}  // namespace

bool via_fp32(const at::Tensor& a, const at::Tensor& b) {
  return a.device().is_cpu() && via_fp32(a.scalar_type(), a.size(0), a.size(1), b.size(1), col_major(b));
}

void mm_out_blocks(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const BlockFn& after) {
  const bool dnn = onednn(a, b);
  const int64_t N = b.size(1), nb = dnn ? 0 : block_of(a, b);
  if (!out.defined() && dnn) {
    out = onednn_mm(a, b);  // oneDNN's own result tensor: no copy into a second [M, N]
  } else {
    if (!out.defined()) out = at::empty({a.size(0), N}, a.options());
    if (nb == 0) gemm::mm_out(out, a, b);
  }
  if (nb == 0) {
    if (after) after(0, N);
    return;
  }
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t nc = std::min(nb, N - n0);
    at::Tensor dst = out.narrow(1, n0, nc);
    at::mm_out(dst, a, b.narrow(1, n0, nc));
    if (after) after(n0, nc);
  }
}

at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  if (decode(a, b)) return gemv::mm(a, b);
  if (onednn(a, b)) return onednn_mm(a, b);
  if (!via_fp32(a, b) && block_of(a, b) == 0) return at::mm(a, b);
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  gemm::mm_out(out, a, b);
  return out;
}

at::Tensor addmm(const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b) {
  if (decode(a, b)) return gemv::mm(a, b).add_(bias);
  if (onednn(a, b)) {
    if (bias.dim() == 1 && bias.size(0) == b.size(1) && bias.scalar_type() == at::kFloat) return onednn_mm(a, b, bias);
    return onednn_mm(a, b).add_(bias);
  }
  if (!via_fp32(a, b)) {
    if (block_of(a, b) == 0) return at::addmm(bias, a, b);
    at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
    const at::Tensor be = bias.expand({a.size(0), b.size(1)});
    mm_out_blocks(out, a, b, [&](int64_t n0, int64_t nc) { out.narrow(1, n0, nc).add_(be.narrow(1, n0, nc)); });
    return out;
  }
  // A fresh tensor: with one row, expand(...).contiguous() would be bias itself, accumulated into.
  at::Tensor out = bias.expand({a.size(0), b.size(1)}).clone(at::MemoryFormat::Contiguous);
  blocked(out, a, b, 1.0, 1.0);
  return out;
}

bool mm_out_copies(const at::Tensor& b, int64_t M) {
  return onednn_rows(b.scalar_type(), b.device().is_cpu(), M, true, b);
}

void mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (onednn(a, b)) {
    out.copy_(onednn_mm(a, b));
    return;
  }
  if (!via_fp32(a, b)) {
    if (block_of(a, b) == 0) {
      at::mm_out(out, a, b);
    } else {
      mm_out_blocks(out, a, b, {});
    }
    return;
  }
  blocked(out, a, b, 0.0, 1.0);
}

void addmm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha) {
  // A few rows (a decode step's adapter, v Bᵀ at r = 16): the streaming kernels' product and one
  // add over out take less than MKL's or oneDNN's addmm there (benchmarks/README.md, "Decode calls
  // without the dispatcher"). In bf16 / fp16 the product is rounded to the dtype before the add, as
  // an unfused adapter rounds it.
  if (out.scalar_type() == a.scalar_type() && decode(a, b)) {
    out.add_(gemv::mm(a, b), alpha);
    return;
  }
  if (onednn(a, b)) {
    out.add_(onednn_mm(a, b), alpha);
    return;
  }
  if (!via_fp32(a, b)) {
    const int64_t N = b.size(1), nb = block_of(a, b), step = nb ? nb : N;
    for (int64_t n0 = 0; n0 < N; n0 += step) {
      const int64_t nc = std::min(step, N - n0);
      out.narrow(1, n0, nc).addmm_(a, b.narrow(1, n0, nc), /*beta=*/1, alpha);
    }
    return;
  }
  blocked(out, a, b, 1.0, alpha);
}

void mm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (onednn(a, b)) {
    out.copy_(onednn_mm(a, b));
  } else if (out.scalar_type() == a.scalar_type()) {
    at::mm_out(out, a, b);
  } else {
    out.copy_(at::mm(a, b));
  }
}

void set_mode(const char* name) { mode_ref().store(static_cast<int>(parse(name))); }

void set_fp32_engine(const char* name) { engine_ref().store(static_cast<int>(parse_engine(name, "set_fp32_gemm"))); }

const char* fp32_engine() { return onednn_on() ? "onednn" : "aten"; }

const char* engine_setting() { return kEngineNames[static_cast<int>(engine())]; }

int engine_value(const char* name, const char* who) { return static_cast<int>(parse_engine(name, who)); }

int current_engine() { return static_cast<int>(engine()); }

EngineScope::EngineScope(int engine) : prev_(t_engine) { t_engine = engine; }

EngineScope::~EngineScope() { t_engine = prev_; }

const char* mode() {
  return kModeNames[mode_ref().load(std::memory_order_relaxed)];
}

}  // namespace gemm
}  // namespace cpu
}  // namespace pyhappy
