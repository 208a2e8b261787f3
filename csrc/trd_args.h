// The arguments of one pair-sums call, as the Python side passes them (raw pointers, sizes, strides),
// and their validation. Host-only plain C++, shared by the CPU twin and the CUDA launcher.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "trd_shared.h"

namespace vrepa {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline int dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

struct TrdArgs {
  const void* s = nullptr;   // [batch, n, ds] student features, last dim contiguous
  const void* t = nullptr;   // [batch, n, dt] teacher features, last dim contiguous
  const float* s_inv = nullptr;  // [batch, n] contiguous: 1 / max(|s_i|, eps), the fused normalisation
  const float* t_inv = nullptr;  // [batch, n] likewise for the teacher
  float* grad_s = nullptr;   // [batch, n, ds] d sum / d s, fp32, zero-initialised; null when not needed
  float* grad_t = nullptr;   // [batch, n, dt] d sum / d t, likewise
  double* partial = nullptr; // [batch, row_blocks(n) * splits] per-work-item loss sums
  int64_t batch = 0, n = 0, ds = 0, dt = 0;
  int64_t s_stride_b = 0, s_stride_n = 0, t_stride_b = 0, t_stride_n = 0;    // in elements
  int64_t gs_stride_b = 0, gs_stride_n = 0, gt_stride_b = 0, gt_stride_n = 0; // in elements
  int relation = kFull;
  int64_t tokens_per_frame = 1;
  float margin = 0.1f;
  bool symmetric = true;  // false: the deterministic schedule (no atomics)
  int64_t splits = 1;
  bool s_vec16 = false;   // every row of s starts on a 16-byte boundary (set by fill_alignment)
  bool t_vec16 = false;
  int64_t work_first = 0, work_step = 1;  // this rank's work items: work_first + k work_step (sequence parallelism)
  uint32_t* map = nullptr;  // relation pass: [batch, map_tiles(n), 128, 8] int32 sign map (partial: [batch, map_tiles(n)])
};

// The gradient pass for one operand: G = scale * P U, P decoded from the map, U the unit rows of s or t.
struct GradientPassArgs {
  const uint32_t* map = nullptr;  // the relation pass's map
  const void* x = nullptr;        // [batch, n, dim] unit rows in the input dtype, last dim contiguous
  float* g = nullptr;             // [batch, n, dim] fp32 output, every element written once
  int64_t batch = 0, n = 0, dim = 0;
  int64_t x_stride_b = 0, x_stride_n = 0, g_stride_b = 0, g_stride_n = 0;  // in elements
  float scale = 1.0f;
  bool x_vec16 = false;
};

// Whether rows of a tensor can be copied in 16-byte vectors.
inline bool rows_16b_aligned(const void* base, int64_t stride_b, int64_t stride_n, int element_size) {
  const auto address = reinterpret_cast<uintptr_t>(base);
  return address % 16 == 0 && (stride_b * element_size) % 16 == 0 && (stride_n * element_size) % 16 == 0;
}

inline void fill_alignment(TrdArgs& a, int dtype) {
  a.s_vec16 = rows_16b_aligned(a.s, a.s_stride_b, a.s_stride_n, dtype_size(dtype));
  a.t_vec16 = rows_16b_aligned(a.t, a.t_stride_b, a.t_stride_n, dtype_size(dtype));
}

// Empty when the arguments are consistent, else what is wrong (raised as ValueError in Python).
inline std::string check_args(const TrdArgs& a, int dtype) {
  const int64_t int_max = std::numeric_limits<int32_t>::max();
  if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16)
    return "dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16), got " + std::to_string(dtype);
  if (a.s == nullptr || a.t == nullptr || a.s_inv == nullptr || a.t_inv == nullptr || a.partial == nullptr)
    return "null input, inverse-norm or partial-sum pointer";
  if (a.batch < 1 || a.n < 1 || a.ds < 1 || a.dt < 1)
    return "batch, n, ds and dt must be >= 1, got batch=" + std::to_string(a.batch) + " n=" + std::to_string(a.n) +
           " ds=" + std::to_string(a.ds) + " dt=" + std::to_string(a.dt);
  if (a.n > int_max - kTile) return "n=" + std::to_string(a.n) + " tokens exceeds the int32 token index range";
  if (a.ds > int_max || a.dt > int_max) return "feature dims must fit in int32";
  if (a.relation != kFull && a.relation != kSpatial && a.relation != kTemporal)
    return "relation code must be 0 (full), 1 (spatial) or 2 (temporal), got " + std::to_string(a.relation);
  if (a.tokens_per_frame < 1 || a.n % a.tokens_per_frame != 0)
    return "tokens_per_frame=" + std::to_string(a.tokens_per_frame) + " must be >= 1 and divide n=" +
           std::to_string(a.n);
  if (!(std::isfinite(a.margin) && a.margin >= 0.0f)) return "margin must be finite and >= 0";
  if (a.splits < 1 || a.splits > row_blocks(a.n)) return "splits must be in [1, row_blocks(n)]";
  if (!a.symmetric && a.splits != 1) return "the deterministic schedule takes splits=1";
  if (a.s_stride_n < a.ds || a.t_stride_n < a.dt || a.s_stride_b < 0 || a.t_stride_b < 0)
    return "input strides must describe rows of at least ds (dt) contiguous elements";
  if (a.grad_s != nullptr && a.gs_stride_n < a.ds) return "grad_s row stride is smaller than ds";
  if (a.grad_t != nullptr && a.gt_stride_n < a.dt) return "grad_t row stride is smaller than dt";
  if (work_items(a.batch, a.n, a.splits) > int_max) return "batch * row blocks * splits exceeds 2^31 - 1 work items";
  if (a.work_step < 1 || a.work_first < 0 || a.work_first >= a.work_step)
    return "work=(first, step) must have 0 <= first < step, got (" + std::to_string(a.work_first) + ", " +
           std::to_string(a.work_step) + ")";
  return std::string();
}

// The relation pass takes TrdArgs with `map` set and `partial` sized [batch, map_tiles(n)].
inline std::string check_relation_pass_args(const TrdArgs& a, int dtype) {
  TrdArgs plain = a;
  plain.grad_s = plain.grad_t = nullptr;
  plain.symmetric = true;
  plain.splits = 1;
  const std::string bad = check_args(plain, dtype);
  if (!bad.empty()) return bad;
  if (a.map == nullptr) return "null sign-map pointer";
  if (a.batch * map_tiles(a.n) > std::numeric_limits<int32_t>::max())
    return "batch * map tiles exceeds 2^31 - 1 thread blocks";
  return std::string();
}

// Feature columns of one gradient-pass output tile (and CTA).
constexpr int kGradCols = 128;

inline std::string check_gradient_pass_args(const GradientPassArgs& a, int dtype) {
  const int64_t int_max = std::numeric_limits<int32_t>::max();
  if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16)
    return "dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16), got " + std::to_string(dtype);
  if (a.map == nullptr || a.x == nullptr || a.g == nullptr) return "null map, unit-row or gradient pointer";
  if (a.batch < 1 || a.n < 1 || a.dim < 1)
    return "batch, n and dim must be >= 1, got batch=" + std::to_string(a.batch) + " n=" + std::to_string(a.n) +
           " dim=" + std::to_string(a.dim);
  if (a.n > int_max - kMapTile) return "n=" + std::to_string(a.n) + " tokens exceeds the int32 token index range";
  if (a.dim > int_max) return "the feature dim must fit in int32";
  if (a.x_stride_n < a.dim || a.g_stride_n < a.dim || a.x_stride_b < 0 || a.g_stride_b < 0)
    return "strides must describe rows of at least dim contiguous elements";
  if (!std::isfinite(a.scale)) return "scale must be finite";
  if (a.batch * map_side(a.n) * ceil_div(a.dim, kGradCols) > int_max)
    return "batch * row tiles * feature tiles exceeds 2^31 - 1 thread blocks";
  return std::string();
}

}  // namespace vrepa
