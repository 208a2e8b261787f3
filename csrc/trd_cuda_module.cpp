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

  m.def(
      "pair_sums",
      [](uintptr_t s, uintptr_t t, uintptr_t s_inv, uintptr_t t_inv, uintptr_t grad_s, uintptr_t grad_t,
         uintptr_t partial, int dtype, int64_t batch, int64_t n, int64_t ds, int64_t dt, py::tuple s_strides,
         py::tuple t_strides, py::tuple gs_strides, py::tuple gt_strides, int relation, int64_t tokens_per_frame,
         double margin, bool symmetric, int64_t splits, int device, uintptr_t stream) {
        TrdArgs args = make_args(s, t, s_inv, t_inv, grad_s, grad_t, partial, batch, n, ds, dt, s_strides,
                                 t_strides, gs_strides, gt_strides, relation, tokens_per_frame, margin, symmetric,
                                 splits);
        const std::string bad = check_args(args, dtype);
        if (!bad.empty()) throw py::value_error(bad);
        std::string err;
        {
          py::gil_scoped_release release;
          err = cuda_pair_sums(args, dtype, device, stream);
        }
        if (!err.empty()) throw std::runtime_error(err);
      },
      VREPA_PAIR_SUMS_ARGS, py::arg("device"), py::arg("stream"),
      "Accumulate per-work-item loss sums into `partial` and d sum/d s (t) into grad_s (grad_t), on `stream`.");
  m.def("plan", &launch_plan, py::arg("batch"), py::arg("n"), py::arg("symmetric"), py::arg("parallel_units"),
        "(row_blocks, splits) for a launch; parallel_units is the device's multiprocessor count.");
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
