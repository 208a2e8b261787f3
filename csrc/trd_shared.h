// Plain C++ shared by the CUDA kernels (trd_kernel.cuh) and the CPU twin (trd_cpu.cpp): the tile
// schedule, the relation masks, the epilogue math and the fragment index arithmetic. Everything here is
// a pure function of integers and floats, so the CPU tests exercise exactly what the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define VREPA_HD __host__ __device__ __forceinline__
#else
#define VREPA_HD inline
#endif

namespace vrepa {

// A row block and a column tile are both kTile tokens (the symmetric schedule needs them equal); the
// feature dim is staged through shared memory kChunk values at a time.
constexpr int kTile = 64;
constexpr int kChunk = 64;

enum Relation : int { kFull = 0, kSpatial = 1, kTemporal = 2 };

// ---------------------------------------------------------------------------------------------------
// The sign map of the two-pass path: one 2-bit code per pair, 128 x 128 tiles of the upper triangle
// (I <= J) in row-major order, 8 words of 16 codes per tile row. Python twin: vrepa_kernels/sign_map.py
// (MAP_TILE and the format description); both backends write this exact layout.
// ---------------------------------------------------------------------------------------------------
constexpr int kMapTile = 128;  // Python twin: vrepa_kernels/sign_map.MAP_TILE
constexpr int kCodesPerWord = 16;
constexpr int kWordsPerMapRow = kMapTile / kCodesPerWord;
constexpr int kMapTileWords = kMapTile * kWordsPerMapRow;
constexpr uint32_t kCodeNone = 0, kCodePlus = 1, kCodeMinus = 2, kCodeNonFinite = 3;

// Token indices are int32 (checked on the host: N < 2^31 - kTile); element offsets are int64.
VREPA_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
VREPA_HD int64_t row_blocks(int64_t n) { return ceil_div(n, kTile); }
VREPA_HD int64_t element_offset(int64_t batch_index, int64_t stride_b, int64_t token, int64_t stride_n,
                                int64_t feature) {
  return batch_index * stride_b + token * stride_n + feature;
}

// ---------------------------------------------------------------------------------------------------
// Relation masks
// ---------------------------------------------------------------------------------------------------

// Whether pair (i, j) counts, given the frames of i and j (frame = token / tokens_per_frame).
// Branch-free: full keeps all, spatial keeps same-frame pairs, temporal the others.
VREPA_HD bool keep_frames(int relation, int frame_i, int frame_j) {
  return (relation == kFull) | ((relation == kSpatial) == (frame_i == frame_j));
}

VREPA_HD bool keep_pair(int relation, int tokens_per_frame, int i, int j) {
  if (relation == kFull) return true;
  return keep_frames(relation, i / tokens_per_frame, j / tokens_per_frame);
}

// Whether the tile of rows [row0, row_last] x columns [col0, col_last] (inclusive) holds any kept pair.
VREPA_HD bool tile_has_kept_pairs(int relation, int tokens_per_frame, int row0, int row_last, int col0,
                                  int col_last) {
  if (relation == kFull) return true;
  const int r0 = row0 / tokens_per_frame, r1 = row_last / tokens_per_frame;
  const int c0 = col0 / tokens_per_frame, c1 = col_last / tokens_per_frame;
  if (relation == kSpatial) return r0 <= c1 && c0 <= r1;  // the frame ranges overlap
  return !(r0 == r1 && c0 == c1 && r0 == c0);             // temporal: not all in one frame
}

// ---------------------------------------------------------------------------------------------------
// Tile schedule
//
// One work item (one CTA on the GPU) owns row block I of one sample and walks column tiles.
//  * symmetric: tiles J >= I only; a tile off the diagonal counts twice in the loss and also adds
//    P^T X_I to the rows of J (atomics on the GPU). Row block I's tiles are dealt round-robin to
//    `splits` work items, so that the long rows of the triangle do not leave the GPU idle.
//  * deterministic (splits == 1): every column tile the relation keeps, rows I written by their owner only.
// Spatial stops at the end of the last frame that block I touches (and, deterministic, starts at the
// first frame's start); temporal skips tiles that lie inside one frame.
// ---------------------------------------------------------------------------------------------------

struct Work {
  int64_t batch_index;
  int64_t row_block;
  int64_t split;
};

// Heaviest row blocks first (block 0 has the most tiles in the symmetric schedule), every sample of a
// row block next to each other.
VREPA_HD Work decode_work(int64_t linear, int64_t batch, int64_t splits) {
  Work w;
  w.batch_index = linear % batch;
  const int64_t rest = linear / batch;
  w.split = rest % splits;
  w.row_block = rest / splits;
  return w;
}

VREPA_HD int64_t work_items(int64_t batch, int64_t n, int64_t splits) { return batch * row_blocks(n) * splits; }

// Sequence parallelism: rank `first` of `step` ranks takes the work items first, first + step, ... (dealt
// round-robin in the heaviest-first order, so every rank gets a similar share). One rank: first 0, step 1.
VREPA_HD int64_t launched_items(int64_t items, int64_t first, int64_t step) { return ceil_div(items - first, step); }

// Where work item (row_block, split) writes its share of the loss in the [batch, row_blocks * splits] buffer.
VREPA_HD int64_t partial_slot(const Work& w, int64_t n, int64_t splits) {
  return w.batch_index * row_blocks(n) * splits + w.row_block * splits + w.split;
}

struct ColumnPlan {
  int first;  // first tile's column
  int step;   // distance between this work item's tiles
  int end;    // columns at or past `end` are excluded (tiles may straddle it)
};

VREPA_HD ColumnPlan column_plan(int relation, int tokens_per_frame, int n, bool symmetric, int64_t splits,
                                int64_t row_block, int64_t split) {
  const int row0 = static_cast<int>(row_block) * kTile;
  const int last_row = (row0 + kTile < n ? row0 + kTile : n) - 1;
  int begin = 0, end = n;
  if (relation == kSpatial) {
    begin = (row0 / tokens_per_frame) * tokens_per_frame;
    end = (last_row / tokens_per_frame + 1) * tokens_per_frame;
  }
  if (symmetric) begin = row0;
  ColumnPlan plan;
  plan.first = begin + static_cast<int>(split) * kTile;
  plan.step = static_cast<int>(splits) * kTile;
  plan.end = end;
  return plan;
}

// The symmetric schedule counts an off-diagonal tile for itself and its mirror image.
VREPA_HD bool mirrors_tile(bool symmetric, int row0, int col0) { return symmetric && col0 != row0; }
VREPA_HD float tile_weight(bool symmetric, int row0, int col0) {
  return mirrors_tile(symmetric, row0, col0) ? 2.0f : 1.0f;
}

// Work items per row block: enough CTAs for ~8 per SM despite the triangle's imbalance, at most one
// per column tile. The deterministic schedule never splits (a split would need atomics on G_I).
VREPA_HD int64_t choose_splits(int64_t batch, int64_t n, bool symmetric, int64_t parallel_units) {
  if (!symmetric) return 1;
  const int64_t blocks = row_blocks(n);
  int64_t splits = ceil_div(8 * (parallel_units > 0 ? parallel_units : 1), blocks * batch);
  if (splits > blocks) splits = blocks;
  return splits < 1 ? 1 : splits;
}

// Map tiles along one side, and in one sample's upper triangle.
VREPA_HD int64_t map_side(int64_t n) { return ceil_div(n, kMapTile); }
VREPA_HD int64_t map_tiles(int64_t n) { return map_side(n) * (map_side(n) + 1) / 2; }
// Linear index of tile (i, j), i <= j < side: sign_map.tile_index.
VREPA_HD int64_t map_tile_index(int64_t i, int64_t j, int64_t side) { return i * side - i * (i - 1) / 2 + (j - i); }

struct MapTile {
  int64_t i, j;
};

// The inverse of map_tile_index: a square-root estimate of the row, then exact integer corrections.
VREPA_HD MapTile map_tile_of(int64_t linear, int64_t side) {
  const double b = 2.0 * static_cast<double>(side) + 1.0;
  const double disc = b * b - 8.0 * static_cast<double>(linear);
  int64_t i = static_cast<int64_t>((b - sqrt(disc > 0.0 ? disc : 0.0)) * 0.5);
  if (i < 0) i = 0;
  if (i > side - 1) i = side - 1;
  while (i > 0 && map_tile_index(i, i, side) > linear) --i;
  while (i + 1 < side && map_tile_index(i + 1, i + 1, side) <= linear) ++i;
  MapTile t;
  t.i = i;
  t.j = i + (linear - map_tile_index(i, i, side));
  return t;
}

// ---------------------------------------------------------------------------------------------------
// Epilogue math. NaN propagates: a NaN gap gives a NaN element loss and a NaN P.
// (Build without fast-math: `x != x` must stay a NaN test.)
// ---------------------------------------------------------------------------------------------------

// max(|gap| - margin, 0), NaN kept. Branch-free (selects), so CPU loops over it vectorise.
VREPA_HD float element_loss(float gap, float margin) {
  const float excess = (gap < 0.0f ? -gap : gap) - margin;
  return ((excess > 0.0f) | (excess != excess)) ? excess : 0.0f;
}

// dL/dgap: +1 above the margin, -1 below -margin, 0 inside; "+ gap * 0" turns NaN/Inf into NaN.
VREPA_HD float pair_sign(float gap, float margin) {
  return static_cast<float>(gap > margin) - static_cast<float>(gap < -margin) + gap * 0.0f;
}

// The map code of a kept pair: 1 above the margin, 2 below -margin, 0 inside, 3 for NaN/Inf
// (gap - gap is 0 exactly when gap is finite).
VREPA_HD uint32_t pair_code(float gap, float margin) {
  const uint32_t sign = gap > margin ? kCodePlus : (gap < -margin ? kCodeMinus : kCodeNone);
  return (gap - gap) == 0.0f ? sign : kCodeNonFinite;
}

VREPA_HD float quiet_nan() {
#if defined(__CUDA_ARCH__)
  return __int_as_float(0x7fffffff);
#else
  return std::numeric_limits<float>::quiet_NaN();
#endif
}

// P from a code: 0, +1, -1, NaN (selects only: no lookup table, which would live in local memory).
VREPA_HD float code_sign(uint32_t code) {
  return code == kCodeNonFinite ? quiet_nan() : static_cast<float>(code & 1u) - static_cast<float>(code >> 1);
}

// Code c (0..15) of a map word.
VREPA_HD uint32_t word_code(uint32_t word, int c) { return (word >> (2 * c)) & 3u; }

// Gradient scale of the per-sample sum: d sum / d s_hat = 2 P s_hat, d sum / d t_hat = -2 P t_hat.
constexpr float kStudentScale = 2.0f;
constexpr float kTeacherScale = -2.0f;

// ---------------------------------------------------------------------------------------------------
// Fragment index arithmetic of mma.sync.m16n8k16 (f16/bf16 in, f32 accumulate) and ldmatrix.x4.
// ptx: lane = 0..31, group = lane / 4, quad = lane % 4.
// ---------------------------------------------------------------------------------------------------

// Accumulator of one 16x8 MMA tile: register r (0..3) holds row (group + 8 * (r / 2)), column (2 * quad + r % 2).
VREPA_HD int acc_row(int lane, int reg) { return (lane >> 2) + ((reg >> 1) << 3); }
VREPA_HD int acc_col(int lane, int reg) { return ((lane & 3) << 1) + (reg & 1); }

// ldmatrix.x4 takes one 16-byte row address per lane: lanes 8q..8q+7 address the rows of matrix q.
// Each helper gives (row, column) of the shared-memory array that lane points at, relative to the
// 16x16 block being loaded.
//
// A operand (16 m x 16 k) from an [m][k] array, no transpose: matrices (m0-7,k0-7) (m8-15,k0-7)
// (m0-7,k8-15) (m8-15,k8-15) are registers a0..a3.
VREPA_HD int ldsm_a_row(int lane) { return lane & 15; }
VREPA_HD int ldsm_a_col(int lane) { return (lane >> 4) << 3; }
// A operand from a [k][m] array (.trans): same four matrices, stored k-major.
VREPA_HD int ldsm_at_row(int lane) { return (lane & 7) + ((lane >> 4) << 3); }  // k
VREPA_HD int ldsm_at_col(int lane) { return ((lane >> 3) & 1) << 3; }           // m
// B operands of two adjacent 8-column MMA tiles (16 n x 16 k) from an [n][k] array, no transpose:
// registers (b0, b1) of n-tile 0, then of n-tile 1.
VREPA_HD int ldsm_b_row(int lane) { return (lane & 7) + ((lane >> 4) << 3); }  // n
VREPA_HD int ldsm_b_col(int lane) { return ((lane >> 3) & 1) << 3; }           // k
// The same B operands from a [k][n] array (.trans).
VREPA_HD int ldsm_bt_row(int lane) { return lane & 15; }            // k
VREPA_HD int ldsm_bt_col(int lane) { return (lane >> 4) << 3; }     // n

// How a product operand is stored in shared memory: one row per output index (A: [m][k], B: [n][k]) or one
// row per depth index (A: [k][m], B: [k][n]; read by ldmatrix with .trans).
enum class Layout : int { kOutputMajor = 0, kDepthMajor = 1 };

// Element offset of the row address `lane` hands ldmatrix.x4 for the 16x16 block at output index o0 and depth
// k0 of an operand with row stride `stride`: A gives registers a0..a3, B the (b0, b1) of two adjacent n-tiles.
// The kernel passes `layout` as a compile-time constant, so the select folds away.
VREPA_HD int ldsm_a_offset(Layout layout, int lane, int o0, int k0, int stride) {
  return layout == Layout::kDepthMajor ? (k0 + ldsm_at_row(lane)) * stride + o0 + ldsm_at_col(lane)
                                       : (o0 + ldsm_a_row(lane)) * stride + k0 + ldsm_a_col(lane);
}
VREPA_HD int ldsm_b_offset(Layout layout, int lane, int o0, int k0, int stride) {
  return layout == Layout::kDepthMajor ? (k0 + ldsm_bt_row(lane)) * stride + o0 + ldsm_bt_col(lane)
                                       : (o0 + ldsm_b_row(lane)) * stride + k0 + ldsm_b_col(lane);
}

// Warp layout of every 64x64 output tile: 4 warps as 2 x 2, each owning a 32x32 quarter made of
// 2 x 4 MMA tiles of 16x8.
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kWarpRows = 32;
constexpr int kWarpCols = 32;
constexpr int kMmaM = 2;  // 16-row MMA tiles per warp
constexpr int kMmaN = 4;  // 8-column MMA tiles per warp
VREPA_HD int warp_row0(int warp) { return (warp >> 1) * kWarpRows; }
VREPA_HD int warp_col0(int warp) { return (warp & 1) * kWarpCols; }

// Row and column, inside the 64x64 tile, of accumulator element (mi, ni, reg) of thread `thread`.
VREPA_HD int tile_row(int thread, int mi, int reg) {
  return warp_row0(thread >> 5) + mi * 16 + acc_row(thread & 31, reg);
}
VREPA_HD int tile_col(int thread, int ni, int reg) {
  return warp_col0(thread >> 5) + ni * 8 + acc_col(thread & 31, reg);
}

// ---------------------------------------------------------------------------------------------------
// Two-pass kernels (trd_two_pass.cuh): 8 warps as 2 x 4 over a 128 x 128 output tile, each warp owning
// 64 x 32 (4 x 4 MMA tiles of 16 x 8); the fp32 accumulators live in registers for the whole tile.
// ---------------------------------------------------------------------------------------------------
constexpr int kPassWarps = 8;
constexpr int kPassThreads = 32 * kPassWarps;
constexpr int kPassTile = 128;  // rows and columns of a relation-pass tile; rows of a gradient-pass tile
constexpr int kPassWarpRows = 64;
constexpr int kPassWarpCols = 32;
constexpr int kPassMmaM = kPassWarpRows / 16;
constexpr int kPassMmaN = kPassWarpCols / 8;
static_assert(kPassTile == kMapTile, "one relation-pass tile is one map tile");
static_assert(kPassWarps * kPassWarpRows * kPassWarpCols == kPassTile * kPassTile, "8 warps of 64x32 cover 128x128");
VREPA_HD int pass_warp_row0(int warp) { return (warp >> 2) * kPassWarpRows; }
VREPA_HD int pass_warp_col0(int warp) { return (warp & 3) * kPassWarpCols; }
VREPA_HD int pass_tile_row(int thread, int mi, int reg) {
  return pass_warp_row0(thread >> 5) + mi * 16 + acc_row(thread & 31, reg);
}
VREPA_HD int pass_tile_col(int thread, int ni, int reg) {
  return pass_warp_col0(thread >> 5) + ni * 8 + acc_col(thread & 31, reg);
}

}  // namespace vrepa
