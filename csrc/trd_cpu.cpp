// vrepa_kernels._C_cpu: the CPU twin of the CUDA kernel and probes of the shared logic.
//
// The twin walks exactly the GPU's work items and tiles (trd_shared.h: decode_work, column_plan,
// tile_has_kept_pairs, mirrors_tile/tile_weight) and applies the same epilogue (keep_frames,
// element_loss, pair_sign). Only the products differ: register-blocked fp32 loops here, mma.sync there.
// Threads: std::thread, work items dealt round-robin (static, so results are bitwise reproducible);
// in the symmetric schedule each thread adds into a private gradient buffer, summed in thread order.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "trd_args.h"
#include "trd_pybind_args.h"
#include "trd_shared.h"

namespace py = pybind11;

namespace vrepa {
namespace {

// Compiled for the baseline ISA plus x86-64-v3 (AVX2 + FMA) and v4 (AVX-512) clones, picked at load time
// (GCC on x86-64). A plain "avx512f" clone would lack FMA.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(VREPA_NO_CLONES)
#define VREPA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VREPA_CPU_CLONES
#endif

#if defined(__GNUC__)
#define VREPA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define VREPA_ALWAYS_INLINE inline
#endif

// ---------------------------------------------------------------------------------------------------
// Element conversion
// ---------------------------------------------------------------------------------------------------

float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // Inf / NaN
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
  // zero or subnormal: mantissa * 2^-24, exact in fp32
  const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
  return sign ? -magnitude : magnitude;
}

float load_element(const void* base, int64_t offset, int dtype) {
  if (dtype == kFloat32) return static_cast<const float*>(base)[offset];
  const uint16_t h = static_cast<const uint16_t*>(base)[offset];
  return dtype == kBFloat16 ? bf16_to_float(h) : fp16_to_float(h);
}

int64_t round_up(int64_t x, int64_t m) { return ceil_div(x, m) * m; }

// ---------------------------------------------------------------------------------------------------
// The one product kernel: C[r][0..16) += sum_k A[r * a_row + k * a_k] * B[k * ldb + 0..16), r < 4, stored for
// r < rows. Broadcast-FMA form: vectorises over the 16 columns without reassociating any sum.
// ---------------------------------------------------------------------------------------------------
#if defined(__GNUC__) || defined(__clang__)
// GCC/Clang vector extension: 8 accumulators of 8 floats stay in registers (AVX: ymm; baseline: xmm pairs).
typedef float Vec8 __attribute__((vector_size(32)));
VREPA_ALWAYS_INLINE Vec8 load8(const float* p) {
  Vec8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
VREPA_ALWAYS_INLINE void add8(float* p, Vec8 v) {
  Vec8 old = load8(p);
  old += v;
  std::memcpy(p, &old, sizeof old);
}
VREPA_ALWAYS_INLINE void block_4x16(const float* a, int64_t a_row, int64_t a_k, const float* b, int64_t ldb, int depth,
                                    float* c, int64_t ldc, int rows) {
  Vec8 c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {};
  for (int k = 0; k < depth; ++k) {
    const Vec8 b0 = load8(b + k * ldb), b1 = load8(b + k * ldb + 8);
    const float* ak = a + k * a_k;
    const float a0 = ak[0], a1 = ak[a_row], a2 = ak[2 * a_row], a3 = ak[3 * a_row];
    c00 += a0 * b0;
    c01 += a0 * b1;
    c10 += a1 * b0;
    c11 += a1 * b1;
    c20 += a2 * b0;
    c21 += a2 * b1;
    c30 += a3 * b0;
    c31 += a3 * b1;
  }
  const Vec8 out[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
  for (int r = 0; r < rows; ++r) {
    add8(c + r * ldc, out[r][0]);
    add8(c + r * ldc + 8, out[r][1]);
  }
}
#else
VREPA_ALWAYS_INLINE void block_4x16(const float* a, int64_t a_row, int64_t a_k, const float* b, int64_t ldb, int depth,
                                    float* c, int64_t ldc, int rows) {
  float acc[4][16] = {};
  for (int k = 0; k < depth; ++k) {
    const float* bk = b + k * ldb;
    const float a0 = a[k * a_k], a1 = a[a_row + k * a_k], a2 = a[2 * a_row + k * a_k], a3 = a[3 * a_row + k * a_k];
    for (int j = 0; j < 16; ++j) {
      const float x = bk[j];
      acc[0][j] += a0 * x;
      acc[1][j] += a1 * x;
      acc[2][j] += a2 * x;
      acc[3][j] += a3 * x;
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < 16; ++j) c[r * ldc + j] += acc[r][j];
}
#endif

// One sample, packed as fp32.
struct Sample {
  int64_t n = 0, ds = 0, dt = 0;
  int64_t row_stride = 0;  // of `rows` and `units`: ds + round_up(dt, 16), so 16-wide reads stay inside
  int64_t col_count = 0;   // length of s_inv / t_inv: round_up(n, 16) + kTile, so any tile start reads in bounds
  std::vector<float> rows;    // [round_up(n, kTile)][row_stride]: raw [s | t] per token, zero padded
  std::vector<float> units;   // likewise, [s * s_inv | t * t_inv]: the unit rows the gradient products use
  // Column panels: [row_blocks][ds + dt][kTile], panel q holding tokens [q kTile, (q + 1) kTile) transposed (raw,
  // zero padded), so a tile's B operand is one contiguous block (a plain [k][n] transpose strides pages per k).
  std::vector<float> panels;
  std::vector<float> s_inv, t_inv;  // [col_count], zero past n
};

void pack_sample(Sample& p, const TrdArgs& a, int dtype, int64_t b) {
  p.n = a.n;
  p.ds = a.ds;
  p.dt = a.dt;
  p.row_stride = a.ds + round_up(a.dt, 16);
  p.col_count = round_up(a.n, 16) + kTile;
  const int64_t padded_rows = round_up(a.n, kTile);
  p.rows.assign(static_cast<size_t>(padded_rows * p.row_stride), 0.0f);
  p.units.assign(p.rows.size(), 0.0f);
  p.panels.assign(static_cast<size_t>(row_blocks(a.n) * (a.ds + a.dt) * kTile), 0.0f);
  p.s_inv.assign(static_cast<size_t>(p.col_count), 0.0f);
  p.t_inv.assign(static_cast<size_t>(p.col_count), 0.0f);
  for (int64_t i = 0; i < a.n; ++i) {
    p.s_inv[i] = a.s_inv[b * a.n + i];
    p.t_inv[i] = a.t_inv[b * a.n + i];
    float* row = p.rows.data() + i * p.row_stride;
    float* unit = p.units.data() + i * p.row_stride;
    for (int64_t k = 0; k < a.ds; ++k) {
      row[k] = load_element(a.s, element_offset(b, a.s_stride_b, i, a.s_stride_n, k), dtype);
      unit[k] = row[k] * p.s_inv[i];
    }
    for (int64_t k = 0; k < a.dt; ++k) {
      row[a.ds + k] = load_element(a.t, element_offset(b, a.t_stride_b, i, a.t_stride_n, k), dtype);
      unit[a.ds + k] = row[a.ds + k] * p.t_inv[i];
    }
    float* panel = p.panels.data() + (i / kTile) * (a.ds + a.dt) * kTile + i % kTile;
    for (int64_t k = 0; k < a.ds + a.dt; ++k) panel[k * kTile] = row[k];
  }
}

// Scratch of one thread: the current tile's raw Gram products, P, and gradient accumulators.
struct Scratch {
  float gram_s[kTile * kTile];
  float gram_t[kTile * kTile];
  float p[kTile * kTile];
  std::vector<float> panel;  // an unaligned tile's column panel
  std::vector<float> grad_s, grad_t;  // symmetric: [padded n][ld]; deterministic: [kTile][ld]
  int64_t ld_s = 0, ld_t = 0;
};

struct Job {
  const TrdArgs* args;
  const Sample* sample;
  int64_t batch_index;
};

// Adds P U_J (and, mirrored, P^T U_I) to the gradient buffer of one operand (feature offset `feature0` in the
// packed unit rows, `dim` features).
VREPA_ALWAYS_INLINE void add_gradient_tile(const Sample& smp, const float* p, int64_t feature0, int64_t dim, float* g,
                                           int64_t ldg, int64_t g_row_of_i, int row0, int col0, int col_end, int n,
                                           bool mirror, bool deterministic) {
  const float* x = smp.units.data() + feature0;
  const int cols_valid = std::min(kTile, col_end - col0);  // rows of X_J that P can reach
  const int rows_valid = std::min(kTile, n - row0);
  for (int i4 = 0; i4 < rows_valid; i4 += 4) {
    float* g_rows = g + (g_row_of_i + i4) * ldg;
    for (int64_t d = 0; d < dim; d += 16)
      block_4x16(p + i4 * kTile, kTile, 1, x + static_cast<int64_t>(col0) * smp.row_stride + d, smp.row_stride,
                 cols_valid, g_rows + d, ldg, std::min(4, rows_valid - i4));
  }
  if (!mirror || deterministic) return;
  for (int j4 = 0; j4 < cols_valid; j4 += 4) {
    float* g_rows = g + static_cast<int64_t>(col0 + j4) * ldg;
    for (int64_t d = 0; d < dim; d += 16)
      block_4x16(p + j4, 1, kTile, x + static_cast<int64_t>(row0) * smp.row_stride + d, smp.row_stride, rows_valid,
                 g_rows + d, ldg, std::min(4, cols_valid - j4));
  }
}

// One work item: the GPU's CTA. Returns its loss sum (the partial slot's value).
VREPA_CPU_CLONES double run_work_item(const Job& job, const Work& w, Scratch& scratch) {
  const TrdArgs& a = *job.args;
  const Sample& smp = *job.sample;
  const int n = static_cast<int>(a.n);
  const int tpf = static_cast<int>(a.tokens_per_frame);
  const bool deterministic = !a.symmetric;
  const int row0 = static_cast<int>(w.row_block) * kTile;
  const int row_last = std::min(row0 + kTile, n) - 1;
  const ColumnPlan plan = column_plan(a.relation, tpf, n, a.symmetric, a.splits, w.row_block, w.split);
  const bool need_grad = a.grad_s != nullptr || a.grad_t != nullptr;
  // Deterministic: this item owns rows I and accumulates them locally; symmetric: the thread's private buffer.
  const int64_t g_row_of_i = deterministic ? 0 : row0;
  if (deterministic) {
    std::fill(scratch.grad_s.begin(), scratch.grad_s.end(), 0.0f);
    std::fill(scratch.grad_t.begin(), scratch.grad_t.end(), 0.0f);
  }

  double total = 0.0;
  for (int col0 = plan.first; col0 < plan.end; col0 += plan.step) {
    const int col_last = std::min(col0 + kTile, plan.end) - 1;
    if (!tile_has_kept_pairs(a.relation, tpf, row0, row_last, col0, col_last)) continue;

    // Raw Gram products of the student and the teacher; the inverse norms scale them in the epilogue.
    const int64_t depth = smp.ds + smp.dt;
    const float* panel;
    if (col0 % kTile == 0) {
      panel = smp.panels.data() + (col0 / kTile) * depth * kTile;
    } else {  // deterministic spatial tiles start at a frame boundary: transpose this tile's columns here
      scratch.panel.assign(static_cast<size_t>(depth * kTile), 0.0f);
      for (int jj = 0; jj < kTile && col0 + jj < n; ++jj) {
        const float* row = smp.rows.data() + static_cast<int64_t>(col0 + jj) * smp.row_stride;
        for (int64_t k = 0; k < depth; ++k) scratch.panel[k * kTile + jj] = row[k];
      }
      panel = scratch.panel.data();
    }
    std::fill(scratch.gram_s, scratch.gram_s + kTile * kTile, 0.0f);
    std::fill(scratch.gram_t, scratch.gram_t + kTile * kTile, 0.0f);
    for (int i4 = 0; i4 < kTile; i4 += 4)
      for (int j16 = 0; j16 < kTile; j16 += 16) {
        const float* rows = smp.rows.data() + static_cast<int64_t>(row0 + i4) * smp.row_stride;
        block_4x16(rows, smp.row_stride, 1, panel + j16, kTile, static_cast<int>(smp.ds),
                   scratch.gram_s + i4 * kTile + j16, kTile, 4);
        block_4x16(rows + smp.ds, smp.row_stride, 1, panel + smp.ds * kTile + j16, kTile, static_cast<int>(smp.dt),
                   scratch.gram_t + i4 * kTile + j16, kTile, 4);
      }

    // Epilogue (the kernel's, element by element; frames hoisted out of the inner loop)
    int col_frame[kTile];
    for (int jj = 0; jj < kTile; ++jj) col_frame[jj] = (col0 + jj) / tpf;
    const int cols_in = std::min(kTile, plan.end - col0);
    float tile_sum = 0.0f;
    bool any_p = false;
    for (int ii = 0; ii < kTile; ++ii) {
      const int i = row0 + ii;
      const int frame_i = i / tpf;
      const float s_inv_i = smp.s_inv[i], t_inv_i = smp.t_inv[i];
      const float* gs = scratch.gram_s + ii * kTile;
      const float* gt = scratch.gram_t + ii * kTile;
      const float* s_inv_j = smp.s_inv.data() + col0;
      const float* t_inv_j = smp.t_inv.data() + col0;
      float* p_row = scratch.p + ii * kTile;
      float lane_sums[16] = {};  // 16 interleaved partial sums: the loop vectorises without reassociation
      int row_any = 0;
      for (int j16 = 0; j16 < kTile; j16 += 16)
        for (int lane = 0; lane < 16; ++lane) {
          const int jj = j16 + lane;
          const bool keep = (i < n) & (jj < cols_in) & keep_frames(a.relation, frame_i, col_frame[jj]);
          const float gap = gs[jj] * (s_inv_i * s_inv_j[jj]) - gt[jj] * (t_inv_i * t_inv_j[jj]);
          lane_sums[lane] += keep ? element_loss(gap, a.margin) : 0.0f;
          const float p = keep ? pair_sign(gap, a.margin) : 0.0f;
          row_any |= p != 0.0f;
          p_row[jj] = p;
        }
      for (float v : lane_sums) tile_sum += v;
      any_p |= row_any != 0;
    }
    total += static_cast<double>(tile_sum * tile_weight(a.symmetric, row0, col0));
    if (!need_grad || !any_p) continue;

    const bool mirror = mirrors_tile(a.symmetric, row0, col0);
    if (a.grad_s != nullptr)
      add_gradient_tile(smp, scratch.p, 0, a.ds, scratch.grad_s.data(), scratch.ld_s, g_row_of_i, row0, col0, plan.end,
                        n, mirror, deterministic);
    if (a.grad_t != nullptr)
      add_gradient_tile(smp, scratch.p, a.ds, a.dt, scratch.grad_t.data(), scratch.ld_t, g_row_of_i, row0, col0,
                        plan.end, n, mirror, deterministic);
  }

  if (deterministic) {  // the owner writes its rows
    for (int ii = 0; ii < std::min(kTile, n - row0); ++ii) {
      if (a.grad_s != nullptr)
        for (int64_t d = 0; d < a.ds; ++d)
          a.grad_s[element_offset(job.batch_index, a.gs_stride_b, row0 + ii, a.gs_stride_n, d)] =
              kStudentScale * scratch.grad_s[ii * scratch.ld_s + d];
      if (a.grad_t != nullptr)
        for (int64_t d = 0; d < a.dt; ++d)
          a.grad_t[element_offset(job.batch_index, a.gt_stride_b, row0 + ii, a.gt_stride_n, d)] =
              kTeacherScale * scratch.grad_t[ii * scratch.ld_t + d];
    }
  }
  return total;
}

template <class Fn>
void parallel_for_threads(int threads, Fn&& fn) {
  if (threads <= 1) {
    fn(0);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  for (int t = 1; t < threads; ++t) pool.emplace_back([&fn, t] { fn(t); });
  fn(0);
  for (auto& th : pool) th.join();
}

void cpu_pair_sums(const TrdArgs& a, int dtype, int threads) {
  const int64_t blocks = row_blocks(a.n);
  const int64_t items_per_sample = blocks * a.splits;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, items_per_sample)));
  const bool deterministic = !a.symmetric;
  const int64_t padded_n = round_up(a.n, kTile);
  std::vector<Scratch> scratch(static_cast<size_t>(threads));
  for (auto& s : scratch) {
    const int64_t rows = deterministic ? kTile : padded_n;
    s.ld_s = round_up(a.ds, 16);
    s.ld_t = round_up(a.dt, 16);
    if (a.grad_s != nullptr) s.grad_s.assign(static_cast<size_t>(rows * s.ld_s), 0.0f);
    if (a.grad_t != nullptr) s.grad_t.assign(static_cast<size_t>(rows * s.ld_t), 0.0f);
  }
  Sample sample;
  for (int64_t b = 0; b < a.batch; ++b) {
    pack_sample(sample, a, dtype, b);
    const Job job{&a, &sample, b};
    if (!deterministic && b > 0)
      for (auto& s : scratch) {
        std::fill(s.grad_s.begin(), s.grad_s.end(), 0.0f);
        std::fill(s.grad_t.begin(), s.grad_t.end(), 0.0f);
      }
    parallel_for_threads(threads, [&](int t) {
      for (int64_t item = t; item < items_per_sample; item += threads) {
        // The GPU's linear work index of (b, item): heaviest row blocks first; other ranks' items are skipped.
        const int64_t linear = item * a.batch + b;
        if (linear % a.work_step != a.work_first) continue;
        const Work w = decode_work(linear, a.batch, a.splits);
        a.partial[partial_slot(w, a.n, a.splits)] = run_work_item(job, w, scratch[static_cast<size_t>(t)]);
      }
    });
    if (deterministic) continue;
    // Sum the private buffers in thread order (fixed, so reproducible), rows split across threads.
    parallel_for_threads(threads, [&](int t) {
      for (int64_t i = t; i < a.n; i += threads) {
        if (a.grad_s != nullptr)
          for (int64_t d = 0; d < a.ds; ++d) {
            float sum = 0.0f;
            for (const auto& s : scratch) sum += s.grad_s[i * s.ld_s + d];
            a.grad_s[element_offset(b, a.gs_stride_b, i, a.gs_stride_n, d)] = kStudentScale * sum;
          }
        if (a.grad_t != nullptr)
          for (int64_t d = 0; d < a.dt; ++d) {
            float sum = 0.0f;
            for (const auto& s : scratch) sum += s.grad_t[i * s.ld_t + d];
            a.grad_t[element_offset(b, a.gt_stride_b, i, a.gt_stride_n, d)] = kTeacherScale * sum;
          }
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------------
// The two-pass path (trd_two_pass.cuh): the same tiles, epilogue, codes and map layout; plain products.
// ---------------------------------------------------------------------------------------------------

// Rows [0, round_up(n, 128)) of one operand of sample b as fp32 (zero padded), and per 128-token block the
// transposed panel [dim][128], so that a tile's B operand is contiguous.
struct PassOperand {
  int64_t dim = 0;
  std::vector<float> rows, panels, inv;
};

void load_pass_operand(PassOperand& op, const void* x, int64_t stride_b, int64_t stride_n, int64_t dim,
                       const float* inv, int64_t b, int64_t n, int dtype) {
  const int64_t padded = map_side(n) * kMapTile;
  op.dim = dim;
  op.rows.assign(static_cast<size_t>(padded * dim), 0.0f);
  op.panels.assign(static_cast<size_t>(padded * dim), 0.0f);
  op.inv.assign(static_cast<size_t>(padded), 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    op.inv[i] = inv[b * n + i];
    float* panel = op.panels.data() + (i / kMapTile) * dim * kMapTile + i % kMapTile;
    for (int64_t k = 0; k < dim; ++k) {
      const float v = load_element(x, element_offset(b, stride_b, i, stride_n, k), dtype);
      op.rows[i * dim + k] = v;
      panel[k * kMapTile] = v;
    }
  }
}

// gram[128][128] = X_I X_J^T (raw rows).
VREPA_CPU_CLONES void raw_gram(const PassOperand& op, int64_t ti, int64_t tj, float* gram) {
  std::fill(gram, gram + kMapTile * kMapTile, 0.0f);
  const float* panel = op.panels.data() + tj * op.dim * kMapTile;
  for (int i4 = 0; i4 < kMapTile; i4 += 4)
    for (int j16 = 0; j16 < kMapTile; j16 += 16)
      block_4x16(op.rows.data() + (ti * kMapTile + i4) * op.dim, op.dim, 1, panel + j16, kMapTile,
                 static_cast<int>(op.dim), gram + i4 * kMapTile + j16, kMapTile, 4);
}

void cpu_relation_pass(const TrdArgs& a, int dtype, int threads) {
  const int64_t side = map_side(a.n), tiles = map_tiles(a.n);
  const int n = static_cast<int>(a.n), tpf = static_cast<int>(a.tokens_per_frame);
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tiles)));
  PassOperand s, t;
  for (int64_t b = 0; b < a.batch; ++b) {
    load_pass_operand(s, a.s, a.s_stride_b, a.s_stride_n, a.ds, a.s_inv, b, a.n, dtype);
    load_pass_operand(t, a.t, a.t_stride_b, a.t_stride_n, a.dt, a.t_inv, b, a.n, dtype);
    parallel_for_threads(threads, [&](int thread) {
      std::vector<float> gram_s(kMapTile * kMapTile), gram_t(kMapTile * kMapTile);
      std::vector<unsigned char> codes(kMapTile * kMapTile);
      for (int64_t tile = thread; tile < tiles; tile += threads) {
        const MapTile mt = map_tile_of(tile, side);
        const int row0 = static_cast<int>(mt.i) * kMapTile, col0 = static_cast<int>(mt.j) * kMapTile;
        uint32_t* map = a.map + (b * tiles + tile) * kMapTileWords;
        double* partial = a.partial + b * tiles + tile;
        const int row_last = std::min(row0 + kMapTile, n) - 1, col_last = std::min(col0 + kMapTile, n) - 1;
        if (!tile_has_kept_pairs(a.relation, tpf, row0, row_last, col0, col_last)) {
          std::fill(map, map + kMapTileWords, 0u);
          *partial = 0.0;
          continue;
        }
        raw_gram(s, mt.i, mt.j, gram_s.data());
        raw_gram(t, mt.i, mt.j, gram_t.data());
        double total = 0.0;
        for (int ii = 0; ii < kMapTile; ++ii) {
          const int i = row0 + ii;
          float row_sum = 0.0f;
          for (int jj = 0; jj < kMapTile; ++jj) {
            const int j = col0 + jj;
            // The kernel's algebra: (Gs (a_i / b_i)(a_j / b_j) - Gt) b_i b_j, a/b the inverse norms.
            const float ratio = (s.inv[i] / t.inv[i]) * (s.inv[j] / t.inv[j]);
            const float gap = (gram_s[ii * kMapTile + jj] * ratio - gram_t[ii * kMapTile + jj]) * (t.inv[i] * t.inv[j]);
            const bool keep = i < n && j < n && keep_frames(a.relation, i / tpf, j / tpf);
            row_sum += keep ? element_loss(gap, a.margin) : 0.0f;
            codes[ii * kMapTile + jj] = static_cast<unsigned char>(keep ? pair_code(gap, a.margin) : kCodeNone);
          }
          total += static_cast<double>(row_sum);
        }
        for (int w = 0; w < kMapTileWords; ++w) {
          uint32_t word = 0;
          for (int e = 0; e < kCodesPerWord; ++e) word |= static_cast<uint32_t>(codes[w * kCodesPerWord + e]) << (2 * e);
          map[w] = word;
        }
        *partial = total * (mt.i == mt.j ? 1.0 : 2.0);
      }
    });
  }
}

// g = scale P x, P decoded from the map; zero steps skipped at the kernel's step width (so NaN rows of x
// reach the same outputs as on the GPU).
void cpu_gradient_pass(const GradientPassArgs& a, int dtype, int threads) {
  const int64_t side = map_side(a.n), tiles = map_tiles(a.n);
  const int step = dtype == kFloat32 ? 32 : 64;  // trd_two_pass.cuh: grad_step<T>()
  const int64_t ld = round_up(a.dim, 16);
  const int64_t padded = side * kMapTile;
  const int64_t items = a.batch * side;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, items)));
  std::vector<float> units;  // [batch][padded][ld]
  units.assign(static_cast<size_t>(a.batch * padded * ld), 0.0f);
  for (int64_t b = 0; b < a.batch; ++b)
    for (int64_t i = 0; i < a.n; ++i)
      for (int64_t k = 0; k < a.dim; ++k)
        units[(b * padded + i) * ld + k] = load_element(a.x, element_offset(b, a.x_stride_b, i, a.x_stride_n, k), dtype);
  parallel_for_threads(threads, [&](int thread) {
    std::vector<float> p(static_cast<size_t>(kMapTile * step)), acc(static_cast<size_t>(kMapTile * ld));
    for (int64_t item = thread; item < items; item += threads) {
      const int64_t b = item % a.batch, ti = item / a.batch;
      const uint32_t* map = a.map + b * tiles * kMapTileWords;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k0 = 0; k0 < a.n; k0 += step) {
        const int64_t tj = k0 / kMapTile;
        const int c0 = static_cast<int>(k0 % kMapTile);
        bool any = false;
        for (int ii = 0; ii < kMapTile; ++ii)
          for (int kk = 0; kk < step; ++kk) {
            // P_ij from tile (I, J) row i, or from tile (J, I) row j (transposed) below the diagonal
            const int r = tj >= ti ? ii : c0 + kk, c = tj >= ti ? c0 + kk : ii;
            const uint32_t word = map[map_tile_index(std::min(ti, tj), std::max(ti, tj), side) * kMapTileWords +
                                      r * kWordsPerMapRow + c / kCodesPerWord];
            const uint32_t code = word_code(word, c % kCodesPerWord);
            any |= code != kCodeNone;
            p[static_cast<size_t>(ii * step + kk)] = code_sign(code);
          }
        if (!any) continue;
        const float* u = units.data() + (b * padded + k0) * ld;
        for (int i4 = 0; i4 < kMapTile; i4 += 4)
          for (int64_t d = 0; d < ld; d += 16)
            block_4x16(p.data() + i4 * step, step, 1, u + d, ld, step, acc.data() + i4 * ld + d, ld, 4);
      }
      for (int ii = 0; ii < kMapTile && ti * kMapTile + ii < a.n; ++ii)
        for (int64_t d = 0; d < a.dim; ++d)
          a.g[element_offset(b, a.g_stride_b, ti * kMapTile + ii, a.g_stride_n, d)] = a.scale * acc[ii * ld + d];
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Probes of the shared schedule
// ---------------------------------------------------------------------------------------------------

// How many times the schedule counts each pair (i, j): weight-1 tiles count their pairs once, mirrored
// tiles count (i, j) and (j, i). Returned as n*n bytes; the kept pairs must read 1, all others 0.
py::bytes schedule_coverage(int64_t n, int relation, int64_t tokens_per_frame, bool symmetric, int64_t splits) {
  if (n < 1 || n > 4096) throw py::value_error("n must be in [1, 4096] for the coverage probe");
  if (tokens_per_frame < 1 || n % tokens_per_frame) throw py::value_error("tokens_per_frame must divide n");
  if (splits < 1 || (!symmetric && splits != 1)) throw py::value_error("bad splits");
  std::string counts(static_cast<size_t>(n * n), '\0');
  const int nn = static_cast<int>(n), tpf = static_cast<int>(tokens_per_frame);
  const int64_t items = work_items(1, n, splits);
  for (int64_t linear = 0; linear < items; ++linear) {
    const Work w = decode_work(linear, 1, splits);
    const int row0 = static_cast<int>(w.row_block) * kTile;
    const int row_last = std::min(row0 + kTile, nn) - 1;
    const ColumnPlan plan = column_plan(relation, tpf, nn, symmetric, splits, w.row_block, w.split);
    for (int col0 = plan.first; col0 < plan.end; col0 += plan.step) {
      const int col_last = std::min(col0 + kTile, plan.end) - 1;
      if (!tile_has_kept_pairs(relation, tpf, row0, row_last, col0, col_last)) continue;
      for (int i = row0; i <= row_last; ++i)
        for (int j = col0; j <= col_last; ++j) {
          if (!keep_pair(relation, tpf, i, j)) continue;
          counts[static_cast<size_t>(i) * n + j]++;
          if (mirrors_tile(symmetric, row0, col0)) counts[static_cast<size_t>(j) * n + i]++;
        }
    }
  }
  return py::bytes(counts);
}

// ---------------------------------------------------------------------------------------------------
// Emulation of ldmatrix.x4 and mma.m16n8k16 (semantics as the PTX ISA states them), driven by the kernel's
// lane -> address helpers and register loops, against plain products. Catches index mistakes in the
// tensor-core path without a GPU.
// ---------------------------------------------------------------------------------------------------

struct Fragments {
  float v[32][4][2];  // lane, 32-bit register, 16-bit half (low first)
};

// Lanes 8q..8q+7 hold the row addresses (element offsets: row_offset(lane)) of matrix q. Without .trans lane l
// receives row l/4, elements 2(l%4) and 2(l%4)+1 of each matrix; with .trans it receives element l/4 of rows
// 2(l%4) and 2(l%4)+1.
template <class RowOffset>
Fragments emulate_ldmatrix_x4(const std::vector<float>& smem, RowOffset row_offset, bool trans) {
  Fragments f;
  for (int q = 0; q < 4; ++q)
    for (int lane = 0; lane < 32; ++lane) {
      const int group = lane >> 2, quad = lane & 3;
      for (int e = 0; e < 2; ++e) {
        const int source_lane = 8 * q + (trans ? 2 * quad + e : group);
        const int element = trans ? group : 2 * quad + e;
        f.v[lane][q][e] = smem[static_cast<size_t>(row_offset(source_lane) + element)];
      }
    }
  return f;
}

// d += A B for one m16n8k16: A from (a0..a7) = registers 0..3 of each lane, B from registers (b0,b1),(b2,b3).
// PTX layout: a_i row = group + 8 * ((i / 2) % 2), col = 2 quad + (i % 2) + 8 * (i / 4);
// b_i row (k) = 2 quad + (i % 2) + 8 * (i / 2), col = group; c_i row = group + 8 * (i / 2), col = 2 quad + i % 2.
// Returns the number of A/B elements not covered exactly once (0 when the layout is a bijection).
int emulate_mma(float (&d)[32][4], const Fragments& a, const float (&b)[32][2][2]) {
  float am[16][16], bm[16][8];
  int a_hits[16][16] = {}, b_hits[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2, quad = lane & 3;
    for (int i = 0; i < 8; ++i) {
      const int row = group + 8 * ((i / 2) % 2), col = 2 * quad + (i % 2) + 8 * (i / 4);
      am[row][col] = a.v[lane][i / 2][i % 2];
      a_hits[row][col]++;
    }
    for (int i = 0; i < 4; ++i) {
      const int k = 2 * quad + (i % 2) + 8 * (i / 2);
      bm[k][group] = b[lane][i / 2][i % 2];
      b_hits[k][group]++;
    }
  }
  int bad = 0;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) bad += a_hits[r][c] != 1;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 8; ++c) bad += b_hits[r][c] != 1;
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2, quad = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = group + 8 * (i / 2), col = 2 * quad + i % 2;
      float sum = 0.0f;
      for (int k = 0; k < 16; ++k) sum += am[row][k] * bm[k][col];
      d[lane][i] += sum;
    }
  }
  return bad;
}

// One warp's 32x32 quarter, exactly as mma_product in trd_kernel.cuh walks it for these operand layouts.
// Returns the number of wrong accumulator values (plus layout-coverage faults).
int check_warp_product(Layout a_layout, Layout b_layout, std::mt19937& rng) {
  const bool a_depth_major = a_layout == Layout::kDepthMajor, b_depth_major = b_layout == Layout::kDepthMajor;
  const int stride = kChunk + 8;  // the bf16 shared-memory row stride
  std::uniform_int_distribution<int> small(-3, 3);
  std::vector<float> a(static_cast<size_t>(kTile * stride)), x(static_cast<size_t>(kTile * stride));
  for (auto& v : a) v = static_cast<float>(small(rng));  // small integers: every sum is exact
  for (auto& v : x) v = static_cast<float>(small(rng));
  float acc[kMmaM][kMmaN][32][4] = {};
  int bad = 0;
  for (int k = 0; k < kChunk; k += 16) {
    Fragments af[kMmaM];
    for (int mi = 0; mi < kMmaM; ++mi)
      af[mi] = emulate_ldmatrix_x4(
          a, [&](int lane) { return ldsm_a_offset(a_layout, lane, mi * 16, k, stride); }, a_depth_major);
    float bf[kMmaN][32][2][2];
    for (int nj = 0; nj < kMmaN / 2; ++nj) {
      const Fragments r = emulate_ldmatrix_x4(
          x, [&](int lane) { return ldsm_b_offset(b_layout, lane, nj * 16, k, stride); }, b_depth_major);
      for (int lane = 0; lane < 32; ++lane)
        for (int e = 0; e < 2; ++e) {
          bf[2 * nj][lane][0][e] = r.v[lane][0][e];
          bf[2 * nj][lane][1][e] = r.v[lane][1][e];
          bf[2 * nj + 1][lane][0][e] = r.v[lane][2][e];
          bf[2 * nj + 1][lane][1][e] = r.v[lane][3][e];
        }
    }
    for (int mi = 0; mi < kMmaM; ++mi)
      for (int ni = 0; ni < kMmaN; ++ni) bad += emulate_mma(acc[mi][ni], af[mi], bf[ni]);
  }
  for (int mi = 0; mi < kMmaM; ++mi)
    for (int ni = 0; ni < kMmaN; ++ni)
      for (int lane = 0; lane < 32; ++lane)
        for (int r = 0; r < 4; ++r) {
          const int row = mi * 16 + acc_row(lane, r), col = ni * 8 + acc_col(lane, r);
          float want = 0.0f;
          for (int k = 0; k < kChunk; ++k) {
            const float lhs = a[static_cast<size_t>(a_depth_major ? k * stride + row : row * stride + k)];
            const float rhs = x[static_cast<size_t>(b_depth_major ? k * stride + col : col * stride + k)];
            want += lhs * rhs;
          }
          bad += acc[mi][ni][lane][r] != want;
        }
  return bad;
}

py::dict fragment_selftest(unsigned seed) {
  std::mt19937 rng(seed);
  py::dict out;
  // The kernel's three products: Gram S_I S_J^T, P U_J, P^T U_I.
  out["nt"] = check_warp_product(Layout::kOutputMajor, Layout::kOutputMajor, rng);
  out["nn"] = check_warp_product(Layout::kOutputMajor, Layout::kDepthMajor, rng);
  out["tn"] = check_warp_product(Layout::kDepthMajor, Layout::kDepthMajor, rng);
  // Every thread's accumulators must tile the 64x64 output exactly once.
  std::vector<int> hits(kTile * kTile, 0);
  for (int thread = 0; thread < kThreads; ++thread)
    for (int mi = 0; mi < kMmaM; ++mi)
      for (int ni = 0; ni < kMmaN; ++ni)
        for (int r = 0; r < 4; ++r) hits[tile_row(thread, mi, r) * kTile + tile_col(thread, ni, r)]++;
  int coverage = 0;
  for (int h : hits) coverage += h != 1;
  out["tile_coverage"] = coverage;
  return out;
}

}  // namespace
}  // namespace vrepa

using namespace vrepa;

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "CPU twin of the CUDA TRD kernel, and probes of the logic it shares with the kernel.";
  m.attr("tile") = kTile;

  def_pair_sums<int>(
      m, "CPU twin of the CUDA pair_sums: writes per-work-item sums to `partial` and the scaled gradients.",
      [](const TrdArgs& args, int dtype, int threads) {
        if (threads < 1) throw py::value_error("threads must be >= 1");
        py::gil_scoped_release release;
        cpu_pair_sums(args, dtype, threads);
      },
      py::arg("threads"));
  def_plan(m, "(row_blocks, splits) for a launch.");
  m.attr("map_tile") = kMapTile;
  def_relation_pass<int>(
      m, "CPU twin of the relation pass: per-tile loss sums into `partial`, the sign map into `map`.",
      [](const TrdArgs& args, int dtype, int threads) {
        if (threads < 1) throw py::value_error("threads must be >= 1, got " + std::to_string(threads));
        py::gil_scoped_release release;
        cpu_relation_pass(args, dtype, threads);
      },
      py::arg("threads"));
  def_gradient_pass<int>(
      m, "CPU twin of the gradient pass: g = scale P x with P decoded from the map.",
      [](const GradientPassArgs& args, int dtype, int threads) {
        if (threads < 1) throw py::value_error("threads must be >= 1, got " + std::to_string(threads));
        py::gil_scoped_release release;
        cpu_gradient_pass(args, dtype, threads);
      },
      py::arg("threads"));
  m.def("pair_code", &pair_code, py::arg("gap"), py::arg("margin"));
  m.def("code_sign", &code_sign, py::arg("code"));
  m.def(
      "map_tile_of",
      [](int64_t linear, int64_t side) {
        const MapTile t = map_tile_of(linear, side);
        return py::make_tuple(t.i, t.j);
      },
      py::arg("linear"), py::arg("side"));
  m.def("map_tile_index", &map_tile_index, py::arg("i"), py::arg("j"), py::arg("side"));
  m.def("element_loss", &element_loss, py::arg("gap"), py::arg("margin"));
  m.def("pair_sign", &pair_sign, py::arg("gap"), py::arg("margin"));
  m.def("keep_pair", &keep_pair, py::arg("relation"), py::arg("tokens_per_frame"), py::arg("i"), py::arg("j"));
  m.def("tile_has_kept_pairs", &tile_has_kept_pairs, py::arg("relation"), py::arg("tokens_per_frame"),
        py::arg("row0"), py::arg("row_last"), py::arg("col0"), py::arg("col_last"));
  m.def(
      "column_plan",
      [](int relation, int tokens_per_frame, int n, bool symmetric, int64_t splits, int64_t row_block, int64_t split) {
        const ColumnPlan p = column_plan(relation, tokens_per_frame, n, symmetric, splits, row_block, split);
        return py::make_tuple(p.first, p.step, p.end);
      },
      py::arg("relation"), py::arg("tokens_per_frame"), py::arg("n"), py::arg("symmetric"), py::arg("splits"),
      py::arg("row_block"), py::arg("split"));
  m.def(
      "decode_work",
      [](int64_t linear, int64_t batch, int64_t splits) {
        const Work w = decode_work(linear, batch, splits);
        return py::make_tuple(w.batch_index, w.row_block, w.split);
      },
      py::arg("linear"), py::arg("batch"), py::arg("splits"));
  m.def("element_offset", &element_offset, py::arg("batch_index"), py::arg("stride_b"), py::arg("token"),
        py::arg("stride_n"), py::arg("feature"));
  m.def("schedule_coverage", &schedule_coverage, py::arg("n"), py::arg("relation"), py::arg("tokens_per_frame"),
        py::arg("symmetric"), py::arg("splits"));
  m.def("fragment_selftest", &fragment_selftest, py::arg("seed") = 0,
        "Mismatch counts of the emulated tensor-core path (0 everywhere when the index arithmetic is right).");
}
