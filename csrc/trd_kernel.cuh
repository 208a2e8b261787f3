// The fused TRD kernel: one CTA owns row block I (64 tokens) of one sample and walks the column tiles J
// that the schedule (trd_shared.h) gives it. Per tile:
//   1. Gram:     D = (S_I S_J^T) * (a_I a_J^T) - (T_I T_J^T) * (b_I b_J^T) from the raw inputs, where a, b are
//                the inverse row norms (normalisation fused, in fp32), 64x64 fp32 accumulators; feature
//                chunks of 64 staged in shared memory by cp.async (two stages), products by mma.sync
//                (bf16/fp16) or FMA (fp32).
//   2. Epilogue: margin clip, relation mask, loss sum in registers; P = dL/dD in {-1, 0, +1, NaN} to
//                shared memory in the input dtype (exact).
//   3. Gradient: G_I += scale * P U_J, and in the symmetric schedule off the diagonal also
//                G_J += scale * P^T U_I, chunk by chunk of the feature dim, where U = X * inv_norm are the
//                unit rows (scaled in fp32 in shared memory, rounded once to the input dtype, as the Triton
//                kernel does); fp32 atomics in the symmetric schedule, plain read-modify-write by the owning
//                CTA in the deterministic one.
// Included by one .cu file per input dtype, so each instantiation compiles in parallel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "trd_args.h"
#include "trd_shared.h"

// The device primitives (thread/block indices, barriers, cp.async, ldmatrix, mma.sync, atomics): PTX on the
// GPU, or a deterministic emulation on the CPU (trd_emulator.cpp runs this very kernel code in tests).
#ifdef VREPA_EMULATE
#include "trd_device_emulated.h"
#else
#include <cuda_runtime.h>

#include "trd_device_cuda.cuh"
#endif

namespace vrepa {
namespace cuda {

static_assert(kTile == kChunk, "row/column tiles and feature chunks share one shared-memory tile shape");
static_assert(kWarps * kWarpRows * kWarpCols == kTile * kTile, "2x2 warps of 32x32 cover a 64x64 tile");

template <class T>
struct ElementTraits;
template <>
struct ElementTraits<float> {
  static constexpr bool kTensorCores = false;
};
template <>
struct ElementTraits<__nv_bfloat16> {
  static constexpr bool kTensorCores = true;
};
template <>
struct ElementTraits<__half> {
  static constexpr bool kTensorCores = true;
};

// Row stride of every shared-memory tile in elements: 16 bytes of padding per row keep ldmatrix and the
// 16-byte cp.async stores free of bank conflicts and every row 16-byte aligned.
template <class T>
__host__ __device__ constexpr int smem_stride() {
  return kChunk + static_cast<int>(16 / sizeof(T));
}
template <class T>
__host__ __device__ constexpr int smem_tile_elems() {
  return kTile * smem_stride<T>();
}
// Two pipeline stages of (row-block tile, column tile), the P tile, then one double per warp.
template <class T>
__host__ __device__ constexpr size_t smem_bytes() {
  return 5 * static_cast<size_t>(smem_tile_elems<T>()) * sizeof(T) + kWarps * sizeof(double);
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

template <class T>
__device__ __forceinline__ T zero_value() { return from_float<T>(0.0f); }

// Two adjacent values (even column) into a shared-memory row; P values are -1, 0, +1 or NaN: exact.
__device__ __forceinline__ void store_pair(float* dst, float a, float b) {
  *reinterpret_cast<float2*>(dst) = make_float2(a, b);
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* dst, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(a, b);
}
__device__ __forceinline__ void store_pair(__half* dst, float a, float b) {
  *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(a, b);
}

using Acc = float[kMmaM][kMmaN][4];

// ---------------------------------------------------------------------------------------------------
// Warp-level products of one 64-deep slice: acc[m][n] += sum_k A(m, k) B(n, k), each operand stored as its
// Layout says (A [m][k] or [k][m], B [n][k] or [k][n]). Each warp owns a 32x32 output quarter; the tile
// pointers passed in already point at that warp's rows (M) and columns (N). The register loops mirror the
// emulation in trd_cpu.cpp (fragment_selftest), which checks the lane -> address arithmetic (ldsm_{a,b}_offset).
// ---------------------------------------------------------------------------------------------------

constexpr int kDepth = kChunk;  // depth of one product: a feature chunk (Gram) or a tile's tokens (gradient)

template <Layout kLayout>
__device__ __forceinline__ void ldsm_x4_of(uint32_t (&r)[4], const void* p) {
  if constexpr (kLayout == Layout::kDepthMajor) {
    ldsm_x4_trans(r, p);
  } else {
    ldsm_x4(r, p);
  }
}

// The generic products below serve both the fused kernel (kMmaM x kMmaN fragments, 64 deep, smem_stride<T>()) and
// the two-pass kernels (kPassMmaM x kPassMmaN fragments, slice or K-step deep, their own strides): the fragment
// counts come from the accumulator's type, the depth and the row strides (elements) are template arguments.

// bf16/fp16: acc[m][n] += sum_k A(m, k) B(n, k) over kProductDepth (-= when `negate`), ldmatrix fragments for both
// operands and mma.sync m16n8k16.
template <Layout kA, Layout kB, int kProductDepth, int kStrideA, int kStrideB, int kM, int kN, class T>
__device__ __forceinline__ void mma_product(float (&acc)[kM][kN][4], const T* a, const T* b, int lane,
                                            bool negate = false) {
#pragma unroll
  for (int k = 0; k < kProductDepth; k += 16) {
    uint32_t af[kM][4], bf[kN][2];
#pragma unroll
    for (int mi = 0; mi < kM; ++mi) ldsm_x4_of<kA>(af[mi], a + ldsm_a_offset(kA, lane, mi * 16, k, kStrideA));
    if (negate)  // flip the sign bits of the 16-bit A values: exact
#pragma unroll
      for (int mi = 0; mi < kM; ++mi)
#pragma unroll
        for (int q = 0; q < 4; ++q) af[mi][q] ^= 0x80008000u;
#pragma unroll
    for (int nj = 0; nj < kN / 2; ++nj) {
      uint32_t r[4];
      ldsm_x4_of<kB>(r, b + ldsm_b_offset(kB, lane, nj * 16, k, kStrideB));
      bf[2 * nj][0] = r[0];
      bf[2 * nj][1] = r[1];
      bf[2 * nj + 1][0] = r[2];
      bf[2 * nj + 1][1] = r[3];
    }
#pragma unroll
    for (int mi = 0; mi < kM; ++mi)
#pragma unroll
      for (int ni = 0; ni < kN; ++ni) mma_16816(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1], T());
  }
}

// fp32, both operands output-major (the Gram products), A [m][k] and B [n][k] with row stride kStride: 4-deep dot
// products from float4 rows, the K loop unrolled kUnroll times; -= when `negate`.
template <int kProductDepth, int kStride, int kUnroll, int kM, int kN>
__device__ __forceinline__ void fma_product_rows(float (&acc)[kM][kN][4], const float* a, const float* b, int lane,
                                                 bool negate = false) {
  const float sign = negate ? -1.0f : 1.0f;
#pragma unroll(kUnroll)
  for (int k = 0; k < kProductDepth; k += 4) {
    float4 bv[kN][2];
#pragma unroll
    for (int ni = 0; ni < kN; ++ni)
#pragma unroll
      for (int e = 0; e < 2; ++e) bv[ni][e] = *reinterpret_cast<const float4*>(b + (ni * 8 + acc_col(lane, e)) * kStride + k);
#pragma unroll
    for (int mi = 0; mi < kM; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float4 x = *reinterpret_cast<const float4*>(a + (mi * 16 + acc_row(lane, 2 * h)) * kStride + k);
        x = make_float4(sign * x.x, sign * x.y, sign * x.z, sign * x.w);
#pragma unroll
        for (int ni = 0; ni < kN; ++ni)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float4 y = bv[ni][e];
            float v = acc[mi][ni][2 * h + e];
            v = fmaf(x.x, y.x, v);
            v = fmaf(x.y, y.y, v);
            v = fmaf(x.z, y.z, v);
            v = fmaf(x.w, y.w, v);
            acc[mi][ni][2 * h + e] = v;
          }
      }
  }
}

// fp32 A values of output row m at depths k..k+3.
template <Layout kA>
__device__ __forceinline__ float4 fma_a_values(const float* a, int m, int k) {
  constexpr int S = smem_stride<float>();
  if constexpr (kA == Layout::kDepthMajor) {
    return make_float4(a[k * S + m], a[(k + 1) * S + m], a[(k + 2) * S + m], a[(k + 3) * S + m]);
  } else {
    return *reinterpret_cast<const float4*>(a + m * S + k);
  }
}

// fp32, B depth-major (the gradient products): rank-1 updates with float2 rows of B. Unrolled 8 deep from
// float4 rows of A, 4 deep from scalar columns.
template <Layout kA>
__device__ __forceinline__ void fma_product_outer(Acc& acc, const float* a, const float* b, int lane) {
  constexpr int S = smem_stride<float>();
#pragma unroll(kA == Layout::kDepthMajor ? 1 : 2)
  for (int k = 0; k < kDepth; k += 4) {
    float4 av[kMmaM][2];
#pragma unroll
    for (int mi = 0; mi < kMmaM; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) av[mi][h] = fma_a_values<kA>(a, mi * 16 + acc_row(lane, 2 * h), k);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      float2 bv[kMmaN];
#pragma unroll
      for (int ni = 0; ni < kMmaN; ++ni)
        bv[ni] = *reinterpret_cast<const float2*>(b + (k + kk) * S + ni * 8 + acc_col(lane, 0));
#pragma unroll
      for (int mi = 0; mi < kMmaM; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float4 a4 = av[mi][h];
          const float p = kk == 0 ? a4.x : kk == 1 ? a4.y : kk == 2 ? a4.z : a4.w;
#pragma unroll
          for (int ni = 0; ni < kMmaN; ++ni) {
            acc[mi][ni][2 * h] = fmaf(p, bv[ni].x, acc[mi][ni][2 * h]);
            acc[mi][ni][2 * h + 1] = fmaf(p, bv[ni].y, acc[mi][ni][2 * h + 1]);
          }
        }
    }
  }
}

template <Layout kA, Layout kB, class T>
__device__ __forceinline__ void warp_product(Acc& acc, const T* a, const T* b, int lane) {
  if constexpr (ElementTraits<T>::kTensorCores) {
    mma_product<kA, kB, kDepth, smem_stride<T>(), smem_stride<T>()>(acc, a, b, lane);
  } else if constexpr (kB == Layout::kOutputMajor) {
    static_assert(kA == Layout::kOutputMajor, "fp32 products with B [n][k] take A [m][k]");
    fma_product_rows<kDepth, smem_stride<float>(), 2>(acc, a, b, lane);
  } else {
    fma_product_outer<kA>(acc, a, b, lane);
  }
}

// ---------------------------------------------------------------------------------------------------
// Global -> shared staging
// ---------------------------------------------------------------------------------------------------

// tile[r][c] = X[row0 + r][col0 + c] for r < kRows, c < kCols (row stride kStride), rows < row_limit and columns
// < dim, zero elsewhere; kThreadCount threads share the vectors. 16-byte cp.async where the whole vector is in range
// and rows are 16-byte aligned, else element loads.
template <class T, int kRows, int kCols, int kStride, int kThreadCount, class Col>
__device__ __forceinline__ void stage_block(T* tile, const T* x, int64_t stride_n, int row0, int row_limit, Col col0,
                                            int64_t dim, bool vec16) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kVecsPerRow = kCols / kVec;
  for (int v = thread_id(); v < kRows * kVecsPerRow; v += kThreadCount) {
    const int r = v / kVecsPerRow;
    const int c = (v % kVecsPerRow) * kVec;
    const int row = row0 + r;
    const int64_t col = static_cast<int64_t>(col0) + c;
    T* dst = tile + r * kStride + c;
    const T* src = x + static_cast<int64_t>(row) * stride_n + col;
    if (row < row_limit && vec16 && col + kVec <= dim) {
      cp_async_16(dst, src);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) dst[e] = (row < row_limit && col + e < dim) ? src[e] : zero_value<T>();
    }
  }
}

// A 64 x 64 tile of the fused kernel (kChunk features of kTile rows).
template <class T>
__device__ __forceinline__ void stage_tile(T* tile, const T* x, int64_t stride_n, int row0, int row_limit, int col0,
                                           int64_t dim, bool vec16) {
  stage_block<T, kTile, kChunk, smem_stride<T>(), kThreads>(tile, x, stride_n, row0, row_limit, col0, dim, vec16);
}

// Multiplies the rows that this thread staged (stage_tile's vectors) by the tokens' inverse norms, in fp32,
// in place: no barrier is needed between the two since each vector has a single owner.
template <class T>
__device__ __forceinline__ void scale_staged_rows(T* tile, const float* inv, int row0, int row_limit) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kVecsPerRow = kChunk / kVec;
  constexpr int S = smem_stride<T>();
  for (int v = thread_id(); v < kTile * kVecsPerRow; v += kThreads) {
    const int r = v / kVecsPerRow;
    const int row = row0 + r;
    const float factor = row < row_limit ? inv[row] : 0.0f;
    T* x = tile + r * S + (v % kVecsPerRow) * kVec;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      x[e] = from_float<T>(to_float(x[e]) * factor);
    }
  }
}

// Step c of the two-stage cp.async pipeline over `chunks` chunks (chunk 0 issued before the loop): issues
// chunk c + 1, then waits until this thread's copies of chunk c have landed (a barrier publishes them).
template <class Issue>
__device__ __forceinline__ void issue_next_wait_current(const Issue& issue, int c, int chunks) {
  if (c + 1 < chunks) {
    issue(c + 1);
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
}

// Fixed-order sum of one double per thread over the CTA's kNumWarps warps (bitwise reproducible): warp shuffles,
// then one slot per warp in shared memory; thread 0 hands the total to `store`.
template <int kNumWarps, class Store>
__device__ __forceinline__ void block_sum(double thread_sum, double* warp_sums, int thread, int lane, int warp,
                                          const Store& store) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) thread_sum += warp_shfl_xor(thread_sum, offset);
  if (lane == 0) warp_sums[warp] = thread_sum;
  block_sync();
  if (thread == 0) {
    double total = 0.0;
#pragma unroll
    for (int w = 0; w < kNumWarps; ++w) total += warp_sums[w];
    store(total);
  }
}

struct Operand {
  const void* base;  // this sample's rows
  const float* inv;  // this sample's inverse row norms
  int64_t stride_n;
  int64_t dim;
  bool vec16;
};

// Inverse norms of the rows (4) or columns (8) this thread's accumulators cover; 0 outside [0, limit).
struct EdgeScales {
  float rows[kMmaM][2];
  float cols[kMmaN][2];
};

// ---------------------------------------------------------------------------------------------------
// Tile phases
// ---------------------------------------------------------------------------------------------------

// gap = (S_I S_J^T) * (a_I a_J^T) - (T_I T_J^T) * (b_I b_J^T) for rows [row0, row0 + 64) and columns
// [col0, col0 + 64) (< col_end): the student product is scaled into `gap` after its last chunk, then the
// accumulator restarts for the teacher.
template <class T>
__device__ __forceinline__ void gram_tile(Acc& gap, const Operand& s, const Operand& t, const EdgeScales& s_scale,
                                          const EdgeScales& t_scale, int row0, int n, int col0, int col_end,
                                          T* smem) {
  constexpr int kElems = smem_tile_elems<T>();
  constexpr int S = smem_stride<T>();
  const int lane = thread_id() & 31, warp = thread_id() >> 5;
  const int s_chunks = static_cast<int>(ceil_div(s.dim, kChunk));
  const int chunks = s_chunks + static_cast<int>(ceil_div(t.dim, kChunk));
  auto issue = [&](int c) {
    T* rows = smem + (c & 1) * 2 * kElems;
    // Select field by field: a reference to either operand would put both structs on the stack.
    const bool teacher = c >= s_chunks;
    const T* base = static_cast<const T*>(teacher ? t.base : s.base);
    const int64_t stride_n = teacher ? t.stride_n : s.stride_n;
    const int64_t dim = teacher ? t.dim : s.dim;
    const bool vec16 = teacher ? t.vec16 : s.vec16;
    const int k0 = (teacher ? c - s_chunks : c) * kChunk;
    stage_tile(rows, base, stride_n, row0, n, k0, dim, vec16);
    stage_tile(rows + kElems, base, stride_n, col0, col_end, k0, dim, vec16);
    cp_async_commit();
  };
  Acc acc = {};
  issue(0);
  for (int c = 0; c < chunks; ++c) {
    issue_next_wait_current(issue, c, chunks);
    block_sync();
    const T* rows = smem + (c & 1) * 2 * kElems;
    // S_I S_J^T: A [row token][feature], B [column token][feature]
    warp_product<Layout::kOutputMajor, Layout::kOutputMajor>(acc, rows + warp_row0(warp) * S,
                                                             rows + kElems + warp_col0(warp) * S, lane);
    block_sync();  // the stage is refilled two chunks later
    if (c == s_chunks - 1) {  // student done: gap = Gs, accumulator restarts for the teacher
#pragma unroll
      for (int mi = 0; mi < kMmaM; ++mi)
#pragma unroll
        for (int ni = 0; ni < kMmaN; ++ni)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            gap[mi][ni][r] = acc[mi][ni][r] * (s_scale.rows[mi][r >> 1] * s_scale.cols[ni][r & 1]);
            acc[mi][ni][r] = 0.0f;
          }
    }
  }
#pragma unroll
  for (int mi = 0; mi < kMmaM; ++mi)
#pragma unroll
    for (int ni = 0; ni < kMmaN; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r)
        gap[mi][ni][r] -= acc[mi][ni][r] * (t_scale.rows[mi][r >> 1] * t_scale.cols[ni][r & 1]);
}

__device__ __forceinline__ void add_to_gradient(const Acc& out, float* g, int64_t stride_n, int token0, int token_limit,
                                                int feature0, int64_t dim, float scale, bool atomic) {
  const int thread = thread_id();
  // Registers (2h, 2h + 1) hold two adjacent features of one token: one 8-byte atomic where aligned.
#pragma unroll
  for (int mi = 0; mi < kMmaM; ++mi)
#pragma unroll
    for (int ni = 0; ni < kMmaN; ++ni)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int token = token0 + tile_row(thread, mi, 2 * h);
        const int64_t feature = static_cast<int64_t>(feature0) + tile_col(thread, ni, 0);
        if (token >= token_limit || feature >= dim) continue;
        float* dst = g + static_cast<int64_t>(token) * stride_n + feature;
        const float first = scale * out[mi][ni][2 * h], second = scale * out[mi][ni][2 * h + 1];
        const bool pair = feature + 1 < dim;
        if (atomic) {
          if (pair && reinterpret_cast<uintptr_t>(dst) % 8 == 0) {
            atomic_add2(dst, first, second);
          } else {
            atomic_add(dst, first);
            if (pair) atomic_add(dst + 1, second);
          }
        } else {
          dst[0] += first;
          if (pair) dst[1] += second;
        }
      }
}

// G_I += scale P U_J and, when `mirror`, G_J += scale P^T U_I, over every feature chunk of X (U = unit rows).
template <class T>
__device__ __forceinline__ void gradient_tile(const T* p_tile, const Operand& x, float* g, int64_t g_stride_n,
                                              float scale, int row0, int n, int col0, int col_end, bool mirror,
                                              bool atomic, T* smem) {
  constexpr int kElems = smem_tile_elems<T>();
  constexpr int S = smem_stride<T>();
  const int lane = thread_id() & 31, warp = thread_id() >> 5;
  const int chunks = static_cast<int>(ceil_div(x.dim, kChunk));
  auto issue = [&](int c) {
    T* cols = smem + (c & 1) * 2 * kElems;  // X_J chunk: [column token][feature]
    stage_tile(cols, static_cast<const T*>(x.base), x.stride_n, col0, col_end, c * kChunk, x.dim, x.vec16);
    if (mirror)  // X_I chunk: [row token][feature]
      stage_tile(cols + kElems, static_cast<const T*>(x.base), x.stride_n, row0, n, c * kChunk, x.dim, x.vec16);
    cp_async_commit();
  };
  issue(0);
  for (int c = 0; c < chunks; ++c) {
    issue_next_wait_current(issue, c, chunks);
    T* cols = smem + (c & 1) * 2 * kElems;
    scale_staged_rows(cols, x.inv, col0, col_end);
    if (mirror) scale_staged_rows(cols + kElems, x.inv, row0, n);
    block_sync();
    {
      Acc out = {};
      // P U_J: A = this warp's rows of P [i][j], B = this warp's features of U_J [j][feature]
      warp_product<Layout::kOutputMajor, Layout::kDepthMajor>(out, p_tile + warp_row0(warp) * S,
                                                              cols + warp_col0(warp), lane);
      add_to_gradient(out, g, g_stride_n, row0, n, c * kChunk, x.dim, scale, atomic);
    }
    if (mirror) {
      Acc out = {};
      // P^T U_I: A = this warp's columns of P [i][j] (its output rows are tokens of J), B = U_I [i][feature]
      warp_product<Layout::kDepthMajor, Layout::kDepthMajor>(out, p_tile + warp_row0(warp),
                                                             cols + kElems + warp_col0(warp), lane);
      add_to_gradient(out, g, g_stride_n, col0, col_end, c * kChunk, x.dim, scale, true);
    }
    block_sync();
  }
}

// ---------------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------------

template <class T>
VREPA_KERNEL trd_fused_pair_sums_kernel(const TrdArgs args) {
  T* smem = reinterpret_cast<T*>(dynamic_smem());
  T* p_tile = smem + 4 * smem_tile_elems<T>();
  double* warp_sums = reinterpret_cast<double*>(p_tile + smem_tile_elems<T>());
  constexpr int S = smem_stride<T>();

  const int thread = thread_id(), lane = thread & 31, warp = thread >> 5;
  const Work work = decode_work(args.work_first + block_id() * args.work_step, args.batch, args.splits);
  const int n = static_cast<int>(args.n);
  const int tpf = static_cast<int>(args.tokens_per_frame);
  const int relation = args.relation;
  const float margin = args.margin;
  const int row0 = static_cast<int>(work.row_block) * kTile;
  const int row_last = (row0 + kTile < n ? row0 + kTile : n) - 1;
  const ColumnPlan plan = column_plan(relation, tpf, n, args.symmetric, args.splits, work.row_block, work.split);
  const bool need_grad = args.grad_s != nullptr || args.grad_t != nullptr;

  const Operand s{static_cast<const T*>(args.s) + work.batch_index * args.s_stride_b,
                  args.s_inv + work.batch_index * args.n, args.s_stride_n, args.ds, args.s_vec16};
  const Operand t{static_cast<const T*>(args.t) + work.batch_index * args.t_stride_b,
                  args.t_inv + work.batch_index * args.n, args.t_stride_n, args.dt, args.t_vec16};

  // Frames and inverse norms of the 4 rows this thread holds (rows repeat across ni).
  int row_frame[kMmaM][2];
  EdgeScales s_scale, t_scale;
#pragma unroll
  for (int mi = 0; mi < kMmaM; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = row0 + tile_row(thread, mi, 2 * h);
      row_frame[mi][h] = i / tpf;
      s_scale.rows[mi][h] = i < n ? s.inv[i] : 0.0f;
      t_scale.rows[mi][h] = i < n ? t.inv[i] : 0.0f;
    }

  double thread_sum = 0.0;
  for (int col0 = plan.first; col0 < plan.end; col0 += plan.step) {
    const int col_last = (col0 + kTile < plan.end ? col0 + kTile : plan.end) - 1;
    if (!tile_has_kept_pairs(relation, tpf, row0, row_last, col0, col_last)) continue;  // uniform in the CTA

#pragma unroll
    for (int ni = 0; ni < kMmaN; ++ni)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = col0 + tile_col(thread, ni, e);
        s_scale.cols[ni][e] = j < plan.end ? s.inv[j] : 0.0f;
        t_scale.cols[ni][e] = j < plan.end ? t.inv[j] : 0.0f;
      }
    Acc acc;
    gram_tile<T>(acc, s, t, s_scale, t_scale, row0, n, col0, plan.end, smem);

    // Epilogue: loss and P, in registers.
    float tile_sum = 0.0f;
    bool any_p = false;
#pragma unroll
    for (int ni = 0; ni < kMmaN; ++ni)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = col0 + tile_col(thread, ni, e);
        const int col_frame = j / tpf;
#pragma unroll
        for (int mi = 0; mi < kMmaM; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = 2 * h + e;
            const int i = row0 + tile_row(thread, mi, r);
            const bool keep = i < n && j < plan.end && keep_frames(relation, row_frame[mi][h], col_frame);
            const float gap = acc[mi][ni][r];
            tile_sum += keep ? element_loss(gap, margin) : 0.0f;
            const float p = keep ? pair_sign(gap, margin) : 0.0f;
            any_p |= (p != 0.0f);  // true for NaN
            acc[mi][ni][r] = p;
          }
      }
    thread_sum += static_cast<double>(tile_sum * tile_weight(args.symmetric, row0, col0));
    if (!need_grad) continue;

#pragma unroll
    for (int mi = 0; mi < kMmaM; ++mi)
#pragma unroll
      for (int ni = 0; ni < kMmaN; ++ni)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          store_pair(p_tile + tile_row(thread, mi, 2 * h) * S + tile_col(thread, ni, 0), acc[mi][ni][2 * h],
                     acc[mi][ni][2 * h + 1]);
    // Publishes P to every warp; a tile whose P is all zero adds nothing to any gradient.
    if (!block_sync_or(any_p)) continue;

    const bool mirror = mirrors_tile(args.symmetric, row0, col0);
    if (args.grad_s != nullptr)
      gradient_tile<T>(p_tile, s, args.grad_s + work.batch_index * args.gs_stride_b, args.gs_stride_n, kStudentScale,
                       row0, n, col0, plan.end, mirror, args.symmetric, smem);
    if (args.grad_t != nullptr)
      gradient_tile<T>(p_tile, t, args.grad_t + work.batch_index * args.gt_stride_b, args.gt_stride_n, kTeacherScale,
                       row0, n, col0, plan.end, mirror, args.symmetric, smem);
  }

  block_sum<kWarps>(thread_sum, warp_sums, thread, lane, warp,
                    [&](double total) { args.partial[partial_slot(work, args.n, args.splits)] = total; });
}

#ifndef VREPA_EMULATE
// Host side of one instantiation: raise the shared-memory limit, launch, report the launch error.
template <class T>
cudaError_t launch_pair_sums(const TrdArgs& args, cudaStream_t stream) {
  const size_t smem = smem_bytes<T>();
  cudaError_t err = cudaFuncSetAttribute(trd_fused_pair_sums_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const int64_t blocks = launched_items(work_items(args.batch, args.n, args.splits), args.work_first, args.work_step);
  if (blocks < 1) return cudaSuccess;  // more ranks than work items: nothing for this one
  trd_fused_pair_sums_kernel<T><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

template <class T>
cudaError_t kernel_attributes(cudaFuncAttributes* attributes) {
  return cudaFuncGetAttributes(attributes, trd_fused_pair_sums_kernel<T>);
}

#define VREPA_INSTANTIATE(T)                                                          \
  template cudaError_t launch_pair_sums<T>(const TrdArgs&, cudaStream_t);            \
  template cudaError_t kernel_attributes<T>(cudaFuncAttributes*);
#endif  // VREPA_EMULATE

}  // namespace cuda
}  // namespace vrepa
