// The pyhappy._C extension module. Importing it registers every C++ kernel as a pyhappy:: op
// (each op family's file carries its own TORCH_LIBRARY_FRAGMENT); the Python-visible functions
// here only report how the extension was built.
#include <torch/extension.h>

#include "cpu/cpu_features.h"

#ifndef TORCH_VERSION_MAJOR
#include <torch/version.h>
#endif

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
}
