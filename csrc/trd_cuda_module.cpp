// vrepa_kernels._C_cuda: the CUDA kernels behind raw pointers. No libtorch: one build serves any torch.
#include <pybind11/pybind11.h>

#include "trd_cuda_host.h"
#include "trd_pybind_args.h"

#ifndef VREPA_CUDA_ARCH_LIST
#define VREPA_CUDA_ARCH_LIST ""
#endif
#ifndef VREPA_PTX_ARCH
#define VREPA_PTX_ARCH ""
#endif

namespace py = pybind11;
using namespace vrepa;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "Fused TRD pair sums on CUDA (raw device pointers, caller's stream).";
  m.attr("sass_archs") = VREPA_CUDA_ARCH_LIST;  // e.g. "80,90a"
  m.attr("ptx_arch") = VREPA_PTX_ARCH;         // e.g. "80" (empty: no PTX embedded)
  m.attr("cuda_runtime_version") = cuda_runtime_version();
  m.attr("tile") = kTile;

  def_pair_sums<int, uintptr_t>(
      m, "Accumulate per-work-item loss sums into `partial` and d sum/d s (t) into grad_s (grad_t), on `stream`.",
      [](const TrdArgs& args, int dtype, int device, uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release release;
          err = cuda_pair_sums(args, dtype, device, stream);
        }
        if (!err.empty()) throw std::runtime_error(err);
      },
      py::arg("device"), py::arg("stream"));
  def_plan(m, "(row_blocks, splits) for a launch; parallel_units is the device's multiprocessor count.");
  m.attr("map_tile") = kMapTile;
  def_relation_pass<int, uintptr_t>(
      m, "Pass 1 of the two-pass path on `stream`: per-tile loss sums into `partial`, the sign map into `map`.",
      [](const TrdArgs& args, int dtype, int device, uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release release;
          err = cuda_relation_pass(args, dtype, device, stream);
        }
        if (!err.empty()) throw std::runtime_error(err);
      },
      py::arg("device"), py::arg("stream"));
  def_gradient_pass<int, uintptr_t>(
      m, "Pass 2 of the two-pass path on `stream`: g = scale P x, every element of g written once.",
      [](const GradientPassArgs& args, int dtype, int device, uintptr_t stream) {
        std::string err;
        {
          py::gil_scoped_release release;
          err = cuda_gradient_pass(args, dtype, device, stream);
        }
        if (!err.empty()) throw std::runtime_error(err);
      },
      py::arg("device"), py::arg("stream"));
  m.def("device_problem", &cuda_device_problem, py::arg("device"),
        "Empty string when the kernels can run on `device`, else why not.");
  m.def(
      "multiprocessor_count",
      [](int device) {
        std::string err;
        const int count = cuda_multiprocessor_count(device, &err);
        if (count < 0) throw std::runtime_error(err);
        return count;
      },
      py::arg("device"));
  m.def("driver_version", &cuda_driver_version, "CUDA version the installed driver supports (0 without a driver).");
}
