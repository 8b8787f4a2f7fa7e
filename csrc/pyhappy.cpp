// The pyhappy._C extension module. Importing it registers every C++ kernel as a pyhappy:: op
// (each op family's file carries its own TORCH_LIBRARY_FRAGMENT); the Python-visible functions
// here only report how the extension was built.
#include <torch/extension.h>

#include "cpu/cpu_features.h"
#include "cpu/eager_ops.h"
#include "cpu/gemm.h"
#include "cpu/gemv.h"

#ifndef TORCH_VERSION_MAJOR
#include <torch/version.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <optional>
#include <stdexcept>
#include <string>

namespace {

py::dict build_info() {
  py::dict d;
  d["torch_version_major"] = TORCH_VERSION_MAJOR;
  d["torch_version_minor"] = TORCH_VERSION_MINOR;
#ifdef PYHAPPY_WITH_CUDA
  d["with_cuda"] = true;
#else
  d["with_cuda"] = false;
#endif
  d["avx2_kernels_compiled"] = static_cast<bool>(PYHAPPY_HAVE_AVX2_KERNELS);
  return d;
}

// Writes back and drops from every cache level the lines holding a CPU tensor's storage, so that
// the next read of it comes from memory: the measured dispatch times candidates against a weight
// in the state a model's layer meets it (evicted by the other layers since its last use). Returns
// whether it could (x86-64: clflush; elsewhere nothing is done and the measurement stays warm).
bool evict_from_caches(const at::Tensor& t) {
  if (!t.device().is_cpu() || !t.has_storage() || t.storage().nbytes() == 0) return false;
#if defined(__x86_64__) || defined(_M_X64)
  const char* p = static_cast<const char*>(t.storage().data());
  const size_t n = t.storage().nbytes();
  for (size_t off = 0; off < n; off += 64) _mm_clflush(p + off);
  _mm_clflush(p + n - 1);
  _mm_mfence();
  return true;
#else
  return false;
#endif
}

// A context manager running this thread's products on one engine while it is entered
// (gemm::EngineScope): the name is checked when it is made; enter and exit it on one thread.
class Fp32GemmScope {
 public:
  explicit Fp32GemmScope(const std::string& engine)
      : engine_(pyhappy::cpu::gemm::engine_value(engine.c_str(), "fp32_gemm_scope")) {}
  void enter() {
    if (scope_) throw std::runtime_error("fp32_gemm_scope: this scope is already entered");
    scope_.emplace(engine_);
  }
  void exit() { scope_.reset(); }

 private:
  int engine_;
  std::optional<pyhappy::cpu::gemm::EngineScope> scope_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyhappy C++/CUDA kernels (ops are registered under torch.ops.pyhappy)";
  m.def("build_info", &build_info, "How this extension was compiled");
  m.def("simd_level", &pyhappy::cpu::simd_level,
        "The CPU kernels in use: 'portable', or 'avx2+fma' with '+avxvnni' and/or '+avx512f'");
  m.def("set_simd_level", [](const std::string& level) { pyhappy::cpu::set_simd_level(level.c_str()); },
        "Cap the CPU kernel level: 'portable', 'avx2', 'avxvnni' or 'avx512' (the default: no cap)");
  m.def("set_simd_enabled", &pyhappy::cpu::set_simd_enabled,
        "Enable/disable the AVX2 CPU kernels at run time (tests exercise both paths)");
  m.def("lowp_gemm", &pyhappy::cpu::gemm::mode,
        "How the CPU ops run bf16/fp16 matrix products: 'auto', 'fp32' (blocks in fp32) or 'native' (ATen)");
  m.def("set_lowp_gemm", [](const std::string& mode) { pyhappy::cpu::gemm::set_mode(mode.c_str()); },
        "Set the bf16/fp16 product mode: 'auto' (fp32 blocks where the CPU has no native bf16/fp16 dot "
        "products and the product is not decode-sized), 'fp32' (always) or 'native' (never)");
  m.def("fp32_gemm", &pyhappy::cpu::gemm::fp32_engine,
        "The engine of the CPU ops' fp32 matrix products on this thread: 'onednn' or 'aten' (MKL)");
  m.def("fp32_gemm_setting", &pyhappy::cpu::gemm::engine_setting,
        "The product engine setting in force on this thread: its fp32_gemm_scope, else the process's "
        "(set_fp32_gemm): 'auto', 'aten' or 'onednn'");
  py::class_<Fp32GemmScope>(m, "fp32_gemm_scope",
                            "A context manager: inside it this thread's C++ ops run their products on `engine` "
                            "('auto', 'aten' or 'onednn'), their at::parallel_for workers included, whatever "
                            "set_fp32_gemm chose and without changing what other threads use")
      .def(py::init<const std::string&>(), py::arg("engine"))
      .def("__enter__", [](Fp32GemmScope& s) { s.enter(); return &s; }, py::return_value_policy::reference)
      .def("__exit__", [](Fp32GemmScope& s, const py::args&) { s.exit(); return false; });
  m.def("set_fp32_gemm", [](const std::string& e) { pyhappy::cpu::gemm::set_fp32_engine(e.c_str()); },
        "Set the product engine: 'auto' (pyhappy's streaming kernels for decode-sized products, oneDNN for "
        "other fp32 products where the CPU has AVX-512F, else ATen), 'aten' or 'onednn'");
  m.def("gemv_serves", [](const at::Tensor& a, const at::Tensor& b) { return pyhappy::cpu::gemv::serves(a, b); },
        "Whether pyhappy's decode kernels (csrc/cpu/gemv.h) can serve a @ b: 1-4 rows of a, b a weight or its "
        "transpose (they run under the 'auto' engine)");
  // A decode call's cost beyond its kernel is mostly the memory its Python and C++ layers touch,
  // which a layer's weight stream has evicted since the previous call: called straight through
  // pybind, an op's C++ function touches less than through the dispatcher (benchmarks/README.md,
  // "Design measurements", "Decode calls without the dispatcher").
  m.def("quant_linear_eager",
        [](const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
           int64_t fmt, int64_t N, int64_t group_size, const std::optional<at::Tensor>& bias,
           const std::optional<at::Tensor>& lora_A, const std::optional<at::Tensor>& lora_B,
           const std::optional<at::Tensor>& lora_C, double scaling, double dropout_p,
           const std::optional<at::Tensor>& seed, bool int8_decode, bool int_dot) {
          return std::get<0>(pyhappy::cpu::quant_linear_cpu(x, qdata, scales, zeros, fmt, N, group_size, bias, lora_A,
                                                            lora_B, lora_C, scaling, dropout_p, seed, int8_decode,
                                                            int_dot));
        },
        py::call_guard<py::gil_scoped_release>(),  // as the dispatcher's Python entry releases it
        "y of pyhappy::quant_linear_cpu (the same function, without the dispatcher): the eager inference "
        "path of pyhappy.ops.quant_linear for a call whose arguments it has checked before");
  m.def("lora_linear_eager",
        [](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
           const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_C, double scaling, double dropout_p,
           const std::optional<at::Tensor>& seed) {
          return std::get<0>(
              pyhappy::cpu::lora_linear_cpu(x, weight, bias, lora_A, lora_B, lora_C, scaling, dropout_p, seed));
        },
        py::call_guard<py::gil_scoped_release>(),
        "y of pyhappy::lora_linear_cpu without the dispatcher: the eager inference path of "
        "pyhappy.ops.lora_linear for a call whose arguments it has checked before");
  m.def("lora_linear_step", &pyhappy::cpu::lora_linear_step, py::call_guard<py::gil_scoped_release>(),
        "y of pyhappy::lora_linear (dropout off) recorded for autograd as one C++ node, each pass (fwd_pass, "
        "bwd_pass) on pyhappy's kernels (0), the unfused ATen products (1) or the kernels on ATen (2): the eager "
        "training path of pyhappy.ops.lora_linear for a call whose arguments it has checked and whose passes "
        "are decided");
  m.def("quant_linear_step", &pyhappy::cpu::quant_linear_step, py::call_guard<py::gil_scoped_release>(),
        "y of pyhappy::quant_linear (dropout off, exact) recorded for autograd as one C++ node, each pass on "
        "pyhappy's kernels or (torch_fwd / torch_bwd) on the dequantized weight's ATen products: the eager "
        "training path of pyhappy.ops.quant_linear for a call whose arguments it has checked and whose passes "
        "are decided");
  m.def("evict_from_caches", &evict_from_caches, py::call_guard<py::gil_scoped_release>(),
        "Flush a CPU tensor's storage out of every cache level (x86-64); returns whether it could");
  m.def("gemm_via_fp32",
        [](const at::Tensor& a, int64_t N, bool b_col_major) {
          return a.device().is_cpu() &&
                 pyhappy::cpu::gemm::via_fp32(a.scalar_type(), a.size(0), a.size(1), N, b_col_major);
        },
        "Whether the CPU ops compute a @ b (a [M, K], b [K, N], column-major or not) in fp32 blocks");
  m.def("gemm_column_block",
        [](const at::Tensor& a, int64_t N, bool b_col_major) {
          return a.device().is_cpu()
                     ? pyhappy::cpu::gemm::column_block(a.scalar_type(), a.size(0), a.size(1), N, b_col_major)
                     : int64_t{0};
        },
        "The column-block width the CPU ops use for an fp32 a @ b (a [M, K], b [K, N]); 0: one ATen call");
  m.def("gemm_mm", [](const at::Tensor& a, const at::Tensor& b) { return pyhappy::cpu::gemm::mm(a, b); },
        "Test hook: a @ b the way the CPU ops multiply (see lowp_gemm)");
  m.def("gemm_addmm",
        [](const std::optional<at::Tensor>& bias, const at::Tensor& a, const at::Tensor& b) {
          return bias ? pyhappy::cpu::gemm::addmm(*bias, a, b) : pyhappy::cpu::gemm::mm(a, b);
        },
        "bias + a @ b (bias None: a @ b) the way the CPU ops compute a base linear");
  m.def("gemm_addmm_", [](at::Tensor out, const at::Tensor& a, const at::Tensor& b, double alpha) {
        pyhappy::cpu::gemm::addmm_(out, a, b, alpha);
        return out; }, "Test hook: out += alpha * a @ b the way the CPU ops do it");
}
