// at::parallel_for for pyhappy's CPU kernels: every parallel region of the C++ ops goes through
// cpu::parallel_for, which runs each chunk under the GEMM engine in force on the calling thread
// (gemm::EngineScope). at::parallel_for's worker threads keep no thread-local state of the caller,
// so without it a product inside a worker would use the process-wide engine while the rest of the
// op used the caller's override, and the op would round as neither engine does.
#pragma once

#include <ATen/Parallel.h>

#include "cpu/gemm.h"

namespace pyhappy {
namespace cpu {

template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain_size, const F& f) {
  const int engine = gemm::current_engine();
  at::parallel_for(begin, end, grain_size, [&](int64_t b, int64_t e) {
    gemm::EngineScope scope(engine);
    f(b, e);
  });
}

}  // namespace cpu
}  // namespace pyhappy
