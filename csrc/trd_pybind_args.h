// The pybind11 side shared by the three extension modules: pointers arrive as integers (tensor.data_ptr()).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "trd_args.h"

namespace vrepa {

namespace py = pybind11;

// Defines `pair_sums` on `m` for one backend module: the arguments every module takes (pointers as integers,
// sizes, strides, relation, margin, schedule), then the module's own trailing `Extra...` arguments named by
// `extra_names`. The shared part becomes a TrdArgs checked by check_args (a ValueError says what is wrong)
// before `run(args, dtype, extra...)`.
template <class... Extra, class Run, class... ExtraNames>
void def_pair_sums(py::module_& m, const char* doc, Run run, ExtraNames... extra_names) {
  m.def(
      "pair_sums",
      [run](uintptr_t s, uintptr_t t, uintptr_t s_inv, uintptr_t t_inv, uintptr_t grad_s, uintptr_t grad_t,
            uintptr_t partial, int dtype, int64_t batch, int64_t n, int64_t ds, int64_t dt, py::tuple s_strides,
            py::tuple t_strides, py::tuple gs_strides, py::tuple gt_strides, int relation, int64_t tokens_per_frame,
            double margin, bool symmetric, int64_t splits, py::tuple work, Extra... extra) {
        auto stride = [](const py::tuple& strides, size_t i, const char* name) -> int64_t {
          if (strides.size() != 2) throw py::value_error(std::string(name) + " must be (stride_b, stride_n)");
          return strides[i].cast<int64_t>();
        };
        TrdArgs a;
        a.s = reinterpret_cast<const void*>(s);
        a.t = reinterpret_cast<const void*>(t);
        a.s_inv = reinterpret_cast<const float*>(s_inv);
        a.t_inv = reinterpret_cast<const float*>(t_inv);
        a.grad_s = reinterpret_cast<float*>(grad_s);
        a.grad_t = reinterpret_cast<float*>(grad_t);
        a.partial = reinterpret_cast<double*>(partial);
        a.batch = batch;
        a.n = n;
        a.ds = ds;
        a.dt = dt;
        a.s_stride_b = stride(s_strides, 0, "s_strides");
        a.s_stride_n = stride(s_strides, 1, "s_strides");
        a.t_stride_b = stride(t_strides, 0, "t_strides");
        a.t_stride_n = stride(t_strides, 1, "t_strides");
        a.gs_stride_b = stride(gs_strides, 0, "gs_strides");
        a.gs_stride_n = stride(gs_strides, 1, "gs_strides");
        a.gt_stride_b = stride(gt_strides, 0, "gt_strides");
        a.gt_stride_n = stride(gt_strides, 1, "gt_strides");
        a.relation = relation;
        a.tokens_per_frame = tokens_per_frame;
        a.margin = static_cast<float>(margin);
        a.symmetric = symmetric;
        a.splits = splits;
        if (work.size() != 2) throw py::value_error("work must be (first, step)");
        a.work_first = work[0].cast<int64_t>();
        a.work_step = work[1].cast<int64_t>();
        const std::string bad = check_args(a, dtype);
        if (!bad.empty()) throw py::value_error(bad);
        run(a, dtype, extra...);
      },
      py::arg("s"), py::arg("t"), py::arg("s_inv"), py::arg("t_inv"), py::arg("grad_s"), py::arg("grad_t"),
      py::arg("partial"), py::arg("dtype"), py::arg("batch"), py::arg("n"), py::arg("ds"), py::arg("dt"),
      py::arg("s_strides"), py::arg("t_strides"), py::arg("gs_strides"), py::arg("gt_strides"), py::arg("relation"),
      py::arg("tokens_per_frame"), py::arg("margin"), py::arg("symmetric"), py::arg("splits"), py::arg("work"),
      extra_names..., doc);
}

// Defines `plan(batch, n, symmetric, parallel_units)` -> (row_blocks, splits): the shape of the partial-sum
// buffer the caller allocates for pair_sums.
inline void def_plan(py::module_& m, const char* doc) {
  m.def(
      "plan",
      [](int64_t batch, int64_t n, bool symmetric, int64_t parallel_units) {
        if (batch < 1 || n < 1) throw py::value_error("batch and n must be >= 1");
        return py::make_tuple(row_blocks(n), choose_splits(batch, n, symmetric, parallel_units));
      },
      py::arg("batch"), py::arg("n"), py::arg("symmetric"), py::arg("parallel_units"), doc);
}

// Defines `relation_pass(s, t, s_inv, t_inv, map, partial, dtype, batch, n, ds, dt, s_strides, t_strides,
// relation, tokens_per_frame, margin, extra...)`: the first pass of the two-pass path. `map` is the int32 sign
// map [batch, map_tiles(n), 128, 8], `partial` float64 [batch, map_tiles(n)] (one loss sum per tile).
template <class... Extra, class Run, class... ExtraNames>
void def_relation_pass(py::module_& m, const char* doc, Run run, ExtraNames... extra_names) {
  m.def(
      "relation_pass",
      [run](uintptr_t s, uintptr_t t, uintptr_t s_inv, uintptr_t t_inv, uintptr_t map, uintptr_t partial, int dtype,
            int64_t batch, int64_t n, int64_t ds, int64_t dt, py::tuple s_strides, py::tuple t_strides, int relation,
            int64_t tokens_per_frame, double margin, Extra... extra) {
        auto stride = [](const py::tuple& strides, size_t i, const char* name) -> int64_t {
          if (strides.size() != 2) throw py::value_error(std::string(name) + " must be (stride_b, stride_n)");
          return strides[i].cast<int64_t>();
        };
        TrdArgs a;
        a.s = reinterpret_cast<const void*>(s);
        a.t = reinterpret_cast<const void*>(t);
        a.s_inv = reinterpret_cast<const float*>(s_inv);
        a.t_inv = reinterpret_cast<const float*>(t_inv);
        a.map = reinterpret_cast<uint32_t*>(map);
        a.partial = reinterpret_cast<double*>(partial);
        a.batch = batch;
        a.n = n;
        a.ds = ds;
        a.dt = dt;
        a.s_stride_b = stride(s_strides, 0, "s_strides");
        a.s_stride_n = stride(s_strides, 1, "s_strides");
        a.t_stride_b = stride(t_strides, 0, "t_strides");
        a.t_stride_n = stride(t_strides, 1, "t_strides");
        a.relation = relation;
        a.tokens_per_frame = tokens_per_frame;
        a.margin = static_cast<float>(margin);
        const std::string bad = check_relation_pass_args(a, dtype);
        if (!bad.empty()) throw py::value_error(bad);
        fill_alignment(a, dtype);
        run(a, dtype, extra...);
      },
      py::arg("s"), py::arg("t"), py::arg("s_inv"), py::arg("t_inv"), py::arg("map"), py::arg("partial"),
      py::arg("dtype"), py::arg("batch"), py::arg("n"), py::arg("ds"), py::arg("dt"), py::arg("s_strides"),
      py::arg("t_strides"), py::arg("relation"), py::arg("tokens_per_frame"), py::arg("margin"), extra_names..., doc);
}

// Defines `gradient_pass(map, x, g, dtype, batch, n, dim, x_strides, g_strides, scale, extra...)`: g = scale P x
// for unit rows x [batch, n, dim] (input dtype) into fp32 g, P decoded from the relation pass's map.
template <class... Extra, class Run, class... ExtraNames>
void def_gradient_pass(py::module_& m, const char* doc, Run run, ExtraNames... extra_names) {
  m.def(
      "gradient_pass",
      [run](uintptr_t map, uintptr_t x, uintptr_t g, int dtype, int64_t batch, int64_t n, int64_t dim,
            py::tuple x_strides, py::tuple g_strides, double scale, Extra... extra) {
        auto stride = [](const py::tuple& strides, size_t i, const char* name) -> int64_t {
          if (strides.size() != 2) throw py::value_error(std::string(name) + " must be (stride_b, stride_n)");
          return strides[i].cast<int64_t>();
        };
        GradientPassArgs a;
        a.map = reinterpret_cast<const uint32_t*>(map);
        a.x = reinterpret_cast<const void*>(x);
        a.g = reinterpret_cast<float*>(g);
        a.batch = batch;
        a.n = n;
        a.dim = dim;
        a.x_stride_b = stride(x_strides, 0, "x_strides");
        a.x_stride_n = stride(x_strides, 1, "x_strides");
        a.g_stride_b = stride(g_strides, 0, "g_strides");
        a.g_stride_n = stride(g_strides, 1, "g_strides");
        a.scale = static_cast<float>(scale);
        const std::string bad = check_gradient_pass_args(a, dtype);
        if (!bad.empty()) throw py::value_error(bad);
        a.x_vec16 = rows_16b_aligned(a.x, a.x_stride_b, a.x_stride_n, dtype_size(dtype));
        run(a, dtype, extra...);
      },
      py::arg("map"), py::arg("x"), py::arg("g"), py::arg("dtype"), py::arg("batch"), py::arg("n"), py::arg("dim"),
      py::arg("x_strides"), py::arg("g_strides"), py::arg("scale"), extra_names..., doc);
}

}  // namespace vrepa
