// The two-pass training path (issue 13): no atomics, each output written once, bitwise deterministic.
//
//  * relation pass: one CTA per 128x128 tile (I, J), I <= J, of the linearised upper triangle (every tile
//    the same work, so the grid is balanced). D from the raw inputs and the inverse norms a (student), b
//    (teacher) in one fp32 accumulator: acc = S_I S_J^T, scaled once by (a_i / b_i)(a_j / b_j) after the
//    last student slice, minus T_I T_J^T (the A operand's sign flipped, exact), times b_i b_j in the
//    epilogue; the same algebra as the Triton relation pass, and half the registers of two accumulators
//    (128 for bf16/fp16: two CTAs per SM on sm_90). Feature slices of 128 bytes staged by cp.async in 3
//    stages, ldmatrix + mma.sync for bf16/fp16, FMA for fp32. The epilogue writes the tile's loss sum (off-diagonal
//    tiles count twice) and its 2-bit codes into the sign map (trd_shared.h, sign_map.py).
//  * gradient pass: one CTA per 128 rows x 128 features of G = scale * P U (U: unit rows of s or t, one
//    normalised copy made before the pass, so nothing is rescaled inside the K loop). The K loop walks the
//    column tiles; each step stages the map words (tile (I, J), or (J, I) read transposed for J < I) and U
//    by cp.async (3 stages), decodes the codes into a P tile in shared memory, and multiplies with ldmatrix +
//    mma.sync (fp32: FMA). Steps whose P is all zero are skipped. fp32 accumulators stay on chip; each
//    output element is stored once.
#pragma once

#include "trd_kernel.cuh"

namespace vrepa {
namespace cuda {

constexpr int kStages = 3;
constexpr int kSliceBytes = 128;  // bytes of one staged row slice: 64 bf16/fp16 or 32 fp32 values

template <class T>
__host__ __device__ constexpr int slice_elems() {
  return kSliceBytes / static_cast<int>(sizeof(T));
}
// 16 bytes of padding per shared-memory row: conflict-free ldmatrix and 16-byte aligned rows.
template <class T>
__host__ __device__ constexpr int pad_elems() {
  return 16 / static_cast<int>(sizeof(T));
}

using PassAcc = float[kPassMmaM][kPassMmaN][4];

// ---------------------------------------------------------------------------------------------------
// Shared-memory layouts
// ---------------------------------------------------------------------------------------------------

// Relation pass: kStages x (row tile, column tile) of [128][slice + pad], then one double per warp. After the
// K loop the first 16 KB hold the tile's codes, one byte per pair, [128][128].
template <class T>
__host__ __device__ constexpr int rel_stride() {
  return slice_elems<T>() + pad_elems<T>();
}
template <class T>
__host__ __device__ constexpr int rel_tile_elems() {
  return kPassTile * rel_stride<T>();
}
template <class T>
__host__ __device__ constexpr size_t relation_smem_bytes() {
  return static_cast<size_t>(kStages) * 2 * rel_tile_elems<T>() * sizeof(T) + kPassWarps * sizeof(double);
}
static_assert(kMapTile * kMapTile <= 2 * rel_tile_elems<__half>() * 2, "the codes fit in the first stage");

// Gradient pass: kStages x (map words [2 KB], U [k][128 + pad]), then one P tile, [128][k + pad] or, read
// transposed, [k][128 + pad]. A K step covers grad_step<T>() column tokens.
template <class T>
__host__ __device__ constexpr int grad_step() {
  return slice_elems<T>();
}
constexpr int kRawWords = 512;  // map words staged per K step
template <class T>
__host__ __device__ constexpr int u_stride() {
  return kGradCols + pad_elems<T>();
}
template <class T>
__host__ __device__ constexpr int u_elems() {
  return grad_step<T>() * u_stride<T>();
}
template <class T>
__host__ __device__ constexpr int p_stride() {  // P [i][k]
  return grad_step<T>() + pad_elems<T>();
}
template <class T>
__host__ __device__ constexpr int pt_stride() {  // P^T [k][i]
  return kPassTile + pad_elems<T>();
}
template <class T>
__host__ __device__ constexpr int p_elems() {
  return kPassTile * p_stride<T>() > grad_step<T>() * pt_stride<T>() ? kPassTile * p_stride<T>()
                                                                      : grad_step<T>() * pt_stride<T>();
}
template <class T>
__host__ __device__ constexpr size_t stage_bytes() {
  return kRawWords * sizeof(uint32_t) + static_cast<size_t>(u_elems<T>()) * sizeof(T);
}
template <class T>
__host__ __device__ constexpr size_t gradient_smem_bytes() {
  return kStages * stage_bytes<T>() + static_cast<size_t>(p_elems<T>()) * sizeof(T);
}
static_assert(kPassTile * (grad_step<float>() / kCodesPerWord) <= 4 * kPassTile, "non-transposed raw words fit");
static_assert(grad_step<__half>() * kWordsPerMapRow <= kRawWords, "transposed raw words fit");
static_assert(kMapTile % grad_step<float>() == 0 && kMapTile % grad_step<__half>() == 0, "K steps tile a map tile");

// ---------------------------------------------------------------------------------------------------
// Staging and products
// ---------------------------------------------------------------------------------------------------

// fp32 gradient product, A [m][k] or [k][m], B [k][n]: rank-1 updates.
template <Layout kA, int kDepth, int kStrideA, int kStrideB>
__device__ __forceinline__ void pass_fma_outer(PassAcc& acc, const float* a, const float* b, int lane) {
#pragma unroll 2
  for (int k = 0; k < kDepth; ++k) {
    float2 bv[kPassMmaN];
#pragma unroll
    for (int ni = 0; ni < kPassMmaN; ++ni)
      bv[ni] = *reinterpret_cast<const float2*>(b + k * kStrideB + ni * 8 + acc_col(lane, 0));
#pragma unroll
    for (int mi = 0; mi < kPassMmaM; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = mi * 16 + acc_row(lane, 2 * h);
        const float p = kA == Layout::kDepthMajor ? a[k * kStrideA + m] : a[m * kStrideA + k];
#pragma unroll
        for (int ni = 0; ni < kPassMmaN; ++ni) {
          acc[mi][ni][2 * h] = fmaf(p, bv[ni].x, acc[mi][ni][2 * h]);
          acc[mi][ni][2 * h + 1] = fmaf(p, bv[ni].y, acc[mi][ni][2 * h + 1]);
        }
      }
  }
}

// The Gram product of one staged slice: this warp's 64 rows of the row tile against its 32 columns, added to
// acc, or subtracted when `negate` (the teacher's slices).
template <class T>
__device__ __forceinline__ void gram_slice(PassAcc& acc, const T* rows, const T* cols, int lane, bool negate) {
  constexpr int S = rel_stride<T>();
  if constexpr (ElementTraits<T>::kTensorCores) {
    mma_product<Layout::kOutputMajor, Layout::kOutputMajor, slice_elems<T>(), S, S>(acc, rows, cols, lane, negate);
  } else {
    fma_product_rows<slice_elems<T>(), S, 1>(acc, rows, cols, lane, negate);
  }
}

// acc += P U for one K step; P stored [i][k] (kA output-major) or [k][i] (depth-major), U [k][feature].
template <Layout kA, class T>
__device__ __forceinline__ void p_times_u(PassAcc& acc, const T* p, const T* u, int lane) {
  constexpr int SA = kA == Layout::kDepthMajor ? pt_stride<T>() : p_stride<T>();
  if constexpr (ElementTraits<T>::kTensorCores) {
    mma_product<kA, Layout::kDepthMajor, grad_step<T>(), SA, u_stride<T>()>(acc, p, u, lane);
  } else {
    pass_fma_outer<kA, grad_step<T>(), SA, u_stride<T>()>(acc, p, u, lane);
  }
}

// The 16 codes of a map word as P values (0, +1, -1, NaN) in dst[0..16), dst 8-byte aligned.
template <class T>
__device__ __forceinline__ void decode_word(T* dst, uint32_t word) {
#pragma unroll
  for (int e = 0; e < kCodesPerWord; e += 2)
    store_pair(dst + e, code_sign(word_code(word, e)), code_sign(word_code(word, e + 1)));
}

// One map word from 16 one-byte codes (each 0..3).
__device__ __forceinline__ uint32_t pack_word(const unsigned char* codes) {
  uint32_t word = 0;
#pragma unroll
  for (int e = 0; e < kCodesPerWord; ++e) word |= static_cast<uint32_t>(codes[e]) << (2 * e);
  return word;
}

// ---------------------------------------------------------------------------------------------------
// Pass 1: the relation pass
// ---------------------------------------------------------------------------------------------------

// Two CTAs per SM (128 registers) for bf16/fp16 where two fit the shared memory (sm_90: 2 x 108 KB); one on
// sm_80 (164 KB per SM) and for fp32, which would spill at 128 registers.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define VREPA_RELATION_MIN_BLOCKS(T) 1
#else
#define VREPA_RELATION_MIN_BLOCKS(T) (ElementTraits<T>::kTensorCores ? 2 : 1)
#endif

template <class T>
VREPA_PASS_KERNEL(VREPA_RELATION_MIN_BLOCKS(T)) trd_relation_pass_kernel(const TrdArgs args) {
  constexpr int S = rel_stride<T>();
  constexpr int kElems = rel_tile_elems<T>();
  constexpr int kSlice = slice_elems<T>();
  T* smem = reinterpret_cast<T*>(dynamic_smem());
  double* warp_sums = reinterpret_cast<double*>(smem + kStages * 2 * kElems);

  const int thread = thread_id(), lane = thread & 31, warp = thread >> 5;
  const int64_t side = map_side(args.n), tiles = map_tiles(args.n);
  const int64_t batch_index = block_id() % args.batch, tile = block_id() / args.batch;
  const MapTile mt = map_tile_of(tile, side);
  const int n = static_cast<int>(args.n);
  const int tpf = static_cast<int>(args.tokens_per_frame);
  const int relation = args.relation;
  const float margin = args.margin;
  const int row0 = static_cast<int>(mt.i) * kPassTile, col0 = static_cast<int>(mt.j) * kPassTile;
  const int row_last = (row0 + kPassTile < n ? row0 + kPassTile : n) - 1;
  const int col_last = (col0 + kPassTile < n ? col0 + kPassTile : n) - 1;
  uint32_t* map = args.map + (batch_index * tiles + tile) * kMapTileWords;
  double* partial = args.partial + batch_index * tiles + tile;

  if (!tile_has_kept_pairs(relation, tpf, row0, row_last, col0, col_last)) {  // uniform in the CTA
    for (int w = thread; w < kMapTileWords; w += kPassThreads) map[w] = 0;
    if (thread == 0) *partial = 0.0;
    return;
  }

  const Operand s{static_cast<const T*>(args.s) + batch_index * args.s_stride_b, args.s_inv + batch_index * args.n,
                  args.s_stride_n, args.ds, args.s_vec16};
  const Operand t{static_cast<const T*>(args.t) + batch_index * args.t_stride_b, args.t_inv + batch_index * args.n,
                  args.t_stride_n, args.dt, args.t_vec16};

  const int s_chunks = static_cast<int>(ceil_div(s.dim, kSlice));
  const int chunks = s_chunks + static_cast<int>(ceil_div(t.dim, kSlice));
  auto issue = [&](int c) {
    if (c < chunks) {
      T* stage = smem + (c % kStages) * 2 * kElems;
      // Select field by field: a reference to either operand would put both structs on the stack.
      const bool teacher = c >= s_chunks;
      const T* base = static_cast<const T*>(teacher ? t.base : s.base);
      const int64_t stride_n = teacher ? t.stride_n : s.stride_n;
      const int64_t dim = teacher ? t.dim : s.dim;
      const bool vec16 = teacher ? t.vec16 : s.vec16;
      const int64_t k0 = static_cast<int64_t>(teacher ? c - s_chunks : c) * kSlice;
      stage_block<T, kPassTile, kSlice, S, kPassThreads>(stage, base, stride_n, row0, n, k0, dim, vec16);
      stage_block<T, kPassTile, kSlice, S, kPassThreads>(stage + kElems, base, stride_n, col0, n, k0, dim, vec16);
    }
    cp_async_commit();  // empty groups past the end keep the wait count uniform
  };

  // One accumulator for both Grams: acc = S_I S_J^T (a_i / b_i)(a_j / b_j) - T_I T_J^T, then D = acc b_i b_j.
  PassAcc acc = {};
  issue(0);
  issue(1);
  for (int c = 0; c < chunks; ++c) {
    cp_async_wait<kStages - 2>();  // this thread's copies of slice c have landed
    block_sync();                  // ... everyone's, and every warp is done with slice c - 1's stage
    issue(c + kStages - 1);        // refills that stage
    const T* stage = smem + (c % kStages) * 2 * kElems;
    gram_slice<T>(acc, stage + pass_warp_row0(warp) * S, stage + kElems + pass_warp_col0(warp) * S, lane, c >= s_chunks);
    if (c == s_chunks - 1) {  // student done: rescale once, then the teacher slices subtract
      // a / b of the 8 rows and 8 columns this thread holds (16 divisions, not one per element)
      float row_ratio[kPassMmaM][2], col_ratio[kPassMmaN][2];
#pragma unroll
      for (int mi = 0; mi < kPassMmaM; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int i = row0 + pass_tile_row(thread, mi, 2 * h);
          row_ratio[mi][h] = i < n ? s.inv[i] / t.inv[i] : 0.0f;
        }
#pragma unroll
      for (int ni = 0; ni < kPassMmaN; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = col0 + pass_tile_col(thread, ni, e);
          col_ratio[ni][e] = j < n ? s.inv[j] / t.inv[j] : 0.0f;
        }
#pragma unroll
      for (int mi = 0; mi < kPassMmaM; ++mi)
#pragma unroll
        for (int ni = 0; ni < kPassMmaN; ++ni)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[mi][ni][r] *= row_ratio[mi][r >> 1] * col_ratio[ni][r & 1];
    }
  }
  cp_async_wait<0>();

  // Epilogue: the loss sum in registers, one code byte per pair in shared memory (the stages are free once
  // every warp has passed this barrier).
  block_sync();
  unsigned char* codes = reinterpret_cast<unsigned char*>(smem);
  float row_scale[kPassMmaM][2], col_scale[kPassMmaN][2];  // b of this thread's rows and columns
#pragma unroll
  for (int mi = 0; mi < kPassMmaM; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = row0 + pass_tile_row(thread, mi, 2 * h);
      row_scale[mi][h] = i < n ? t.inv[i] : 0.0f;
    }
#pragma unroll
  for (int ni = 0; ni < kPassMmaN; ++ni)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int j = col0 + pass_tile_col(thread, ni, e);
      col_scale[ni][e] = j < n ? t.inv[j] : 0.0f;
    }
  float tile_sum = 0.0f;
#pragma unroll
  for (int mi = 0; mi < kPassMmaM; ++mi)
#pragma unroll
    for (int ni = 0; ni < kPassMmaN; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int ii = pass_tile_row(thread, mi, r), jj = pass_tile_col(thread, ni, r);
        const int i = row0 + ii, j = col0 + jj;
        const float d = acc[mi][ni][r] * (row_scale[mi][r >> 1] * col_scale[ni][r & 1]);
        const bool keep = i < n && j < n && keep_frames(relation, i / tpf, j / tpf);
        tile_sum += keep ? element_loss(d, margin) : 0.0f;
        codes[ii * kMapTile + jj] = static_cast<unsigned char>(keep ? pair_code(d, margin) : kCodeNone);
      }
  block_sync();
  // Word w of the tile is row w / 8, codes 16 (w % 8) ..: bytes [16 w, 16 w + 16) of `codes`. Coalesced stores.
  for (int w = thread; w < kMapTileWords; w += kPassThreads) map[w] = pack_word(codes + w * kCodesPerWord);

  // An off-diagonal tile stands for its mirror image too.
  block_sum<kPassWarps>(static_cast<double>(tile_sum), warp_sums, thread, lane, warp,
                        [&](double total) { *partial = total * (mt.i == mt.j ? 1.0 : 2.0); });
}

// ---------------------------------------------------------------------------------------------------
// Pass 2: the gradient pass
// ---------------------------------------------------------------------------------------------------

template <class T>
VREPA_PASS_KERNEL(2) trd_gradient_pass_kernel(const GradientPassArgs args) {
  constexpr int kStep = grad_step<T>();
  constexpr int kWordsPerStep = kStep / kCodesPerWord;  // words of one map row that a K step covers
  unsigned char* base = dynamic_smem();
  T* p_tile = reinterpret_cast<T*>(base + kStages * stage_bytes<T>());

  const int thread = thread_id(), lane = thread & 31, warp = thread >> 5;
  const int64_t side = map_side(args.n), tiles = map_tiles(args.n);
  const int64_t feature_tiles = ceil_div(args.dim, kGradCols);
  const int64_t batch_index = block_id() % args.batch;
  const int64_t rest = block_id() / args.batch;
  const int64_t feature0 = (rest % feature_tiles) * kGradCols;
  const int64_t row_tile = rest / feature_tiles;
  const int n = static_cast<int>(args.n);
  const int row0 = static_cast<int>(row_tile) * kPassTile;
  const uint32_t* map = args.map + batch_index * tiles * kMapTileWords;
  const T* x = static_cast<const T*>(args.x) + batch_index * args.x_stride_b;
  const int steps = static_cast<int>(ceil_div(args.n, kStep));

  auto raw_words = [&](int c) { return reinterpret_cast<uint32_t*>(base + (c % kStages) * stage_bytes<T>()); };
  auto u_tile = [&](int c) {
    return reinterpret_cast<T*>(base + (c % kStages) * stage_bytes<T>() + kRawWords * sizeof(uint32_t));
  };
  auto issue = [&](int c) {
    if (c < steps) {
      const int k0 = c * kStep;
      const int64_t col_tile = k0 / kMapTile;
      const int sub = (k0 % kMapTile) / kStep;
      uint32_t* raw = raw_words(c);
      if (col_tile >= row_tile) {  // tile (I, J): all 128 rows, the 16-byte word group holding this step's columns
        const uint32_t* src = map + map_tile_index(row_tile, col_tile, side) * kMapTileWords + ((sub * kWordsPerStep) & ~3);
        for (int r = thread; r < kPassTile; r += kPassThreads) cp_async_16(raw + 4 * r, src + r * kWordsPerMapRow);
      } else {  // tile (J, I), transposed: this step's rows (tokens of J), all 8 words (tokens of I)
        const uint32_t* src = map + map_tile_index(col_tile, row_tile, side) * kMapTileWords + sub * kStep * kWordsPerMapRow;
        for (int v = thread; v < kStep * kWordsPerMapRow / 4; v += kPassThreads) cp_async_16(raw + 4 * v, src + 4 * v);
      }
      stage_block<T, kStep, kGradCols, u_stride<T>(), kPassThreads>(u_tile(c), x, args.x_stride_n, k0, n, feature0, args.dim,
                                                      args.x_vec16);
    }
    cp_async_commit();
  };

  PassAcc acc = {};
  issue(0);
  issue(1);
  for (int c = 0; c < steps; ++c) {
    cp_async_wait<kStages - 2>();
    block_sync();  // step c's words and U are visible; every warp is done with step c - 1 (P and its stage)
    issue(c + kStages - 1);
    const int k0 = c * kStep;
    const bool transposed = k0 / kMapTile < row_tile;
    const uint32_t* raw = raw_words(c);
    bool any = false;
    if (!transposed) {  // P[i][k] from row i's words
      const int offset = (((k0 % kMapTile) / kStep) * kWordsPerStep) & 3;
      for (int v = thread; v < kPassTile * kWordsPerStep; v += kPassThreads) {
        const int i = v / kWordsPerStep, q = v % kWordsPerStep;
        const uint32_t word = raw[4 * i + offset + q];
        any |= word != 0u;
        decode_word(p_tile + i * p_stride<T>() + q * kCodesPerWord, word);
      }
    } else {  // P^T[k][i] from row k of tile (J, I)
      for (int v = thread; v < kStep * kWordsPerMapRow; v += kPassThreads) {
        const int k = v / kWordsPerMapRow, w = v % kWordsPerMapRow;
        const uint32_t word = raw[v];
        any |= word != 0u;
        decode_word(p_tile + k * pt_stride<T>() + w * kCodesPerWord, word);
      }
    }
    if (!block_sync_or(any)) continue;  // P is published; an all-zero step adds nothing
    const T* u = u_tile(c) + pass_warp_col0(warp);
    if (transposed) {
      p_times_u<Layout::kDepthMajor>(acc, p_tile + pass_warp_row0(warp), u, lane);
    } else {
      p_times_u<Layout::kOutputMajor>(acc, p_tile + pass_warp_row0(warp) * p_stride<T>(), u, lane);
    }
  }
  cp_async_wait<0>();

  // Each output element is written once, by this CTA.
  float* g = args.g + batch_index * args.g_stride_b;
#pragma unroll
  for (int mi = 0; mi < kPassMmaM; ++mi)
#pragma unroll
    for (int ni = 0; ni < kPassMmaN; ++ni)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int token = row0 + pass_tile_row(thread, mi, 2 * h);
        const int64_t feature = feature0 + pass_tile_col(thread, ni, 0);
        if (token >= n || feature >= args.dim) continue;
        float* dst = g + static_cast<int64_t>(token) * args.g_stride_n + feature;
        const float first = args.scale * acc[mi][ni][2 * h], second = args.scale * acc[mi][ni][2 * h + 1];
        if (feature + 1 < args.dim && reinterpret_cast<uintptr_t>(dst) % 8 == 0) {
          *reinterpret_cast<float2*>(dst) = make_float2(first, second);
        } else {
          dst[0] = first;
          if (feature + 1 < args.dim) dst[1] = second;
        }
      }
}

#ifndef VREPA_EMULATE
template <class T>
cudaError_t launch_relation_pass(const TrdArgs& args, cudaStream_t stream) {
  const size_t smem = relation_smem_bytes<T>();
  cudaError_t err = cudaFuncSetAttribute(trd_relation_pass_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const int64_t blocks = args.batch * map_tiles(args.n);
  trd_relation_pass_kernel<T><<<static_cast<unsigned>(blocks), kPassThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_gradient_pass(const GradientPassArgs& args, cudaStream_t stream) {
  const size_t smem = gradient_smem_bytes<T>();
  cudaError_t err = cudaFuncSetAttribute(trd_gradient_pass_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const int64_t blocks = args.batch * map_side(args.n) * ceil_div(args.dim, kGradCols);
  trd_gradient_pass_kernel<T><<<static_cast<unsigned>(blocks), kPassThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

template <class T>
cudaError_t two_pass_attributes(cudaFuncAttributes* relation, cudaFuncAttributes* gradient) {
  cudaError_t err = cudaFuncGetAttributes(relation, trd_relation_pass_kernel<T>);
  if (err != cudaSuccess) return err;
  return cudaFuncGetAttributes(gradient, trd_gradient_pass_kernel<T>);
}

#define VREPA_INSTANTIATE_TWO_PASS(T)                                                 \
  template cudaError_t launch_relation_pass<T>(const TrdArgs&, cudaStream_t);        \
  template cudaError_t launch_gradient_pass<T>(const GradientPassArgs&, cudaStream_t); \
  template cudaError_t two_pass_attributes<T>(cudaFuncAttributes*, cudaFuncAttributes*);
#endif  // VREPA_EMULATE

}  // namespace cuda
}  // namespace vrepa
