// The CUDA side as the pybind11 module sees it: plain C++ types only, so the module itself compiles with
// the host compiler and never includes CUDA headers.
#pragma once

#include <cstdint>
#include <string>

#include "trd_args.h"

namespace vrepa {

// Launches the fused kernel on `stream` (a cudaStream_t as an integer) on the current device, which must be
// `device`. Returns an empty string on success, else the error.
std::string cuda_pair_sums(TrdArgs args, int dtype, int device, uintptr_t stream);

// The two passes of the atomics-free training path (trd_two_pass.cuh), checked arguments; same conventions.
std::string cuda_relation_pass(const TrdArgs& args, int dtype, int device, uintptr_t stream);
std::string cuda_gradient_pass(const GradientPassArgs& args, int dtype, int device, uintptr_t stream);

// Empty when the kernels can run on `device`, else why not (no driver, driver too old, no kernel image).
std::string cuda_device_problem(int device);

// Streaming multiprocessors of `device`, or -1 (with *error set) when it cannot be queried.
int cuda_multiprocessor_count(int device, std::string* error);

int cuda_runtime_version();  // e.g. 13000, as compiled in
int cuda_driver_version();   // 0 when no driver is installed

}  // namespace vrepa
