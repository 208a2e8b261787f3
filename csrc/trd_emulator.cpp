// vrepa_kernels._C_emulator: runs the CUDA kernel's own code (trd_kernel.cuh) on the CPU, for tests on
// machines without a GPU. Each CTA's 128 threads are coroutines (ucontext) on the calling OS thread; a
// thread runs until it reaches a warp-collective operation or a barrier, and the scheduler completes the
// operation once every participant has arrived. PTX semantics of ldmatrix.x4 and mma.m16n8k16 as the ISA
// states them (the same as fragment_selftest in trd_cpu.cpp). Slow (tiny shapes only) but exact in
// structure: it executes every barrier, every fragment load and every epilogue line of the kernel.
#define VREPA_EMULATE 1

#include <pybind11/pybind11.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "trd_kernel.cuh"
#include "trd_two_pass.cuh"
#include "trd_pybind_args.h"

namespace py = pybind11;

namespace vrepa {
namespace emu {
namespace {

enum class Wait { kRunnable, kWarp, kBlock, kDone };
enum class Op { kLdmatrix, kMma, kShuffle };

struct Thread {
  ucontext_t context;
  Wait wait = Wait::kRunnable;
  Op op = Op::kLdmatrix;
  // ldmatrix
  const void* address = nullptr;
  bool trans = false;
  uint32_t* registers = nullptr;
  // mma
  float* d = nullptr;
  const uint32_t* a = nullptr;
  uint32_t b0 = 0, b1 = 0;
  bool bf16 = true;
  // shuffle
  double value = 0.0;
  int offset = 0;
  double shuffled = 0.0;
  // barrier
  int predicate = 0, reduced = 0;
  // cp.async groups not yet retired: the open group last
  std::vector<std::vector<std::pair<void*, const void*>>> copies{1};
};

constexpr size_t kStackBytes = 256 * 1024;

struct Cta {
  std::vector<Thread> threads;  // the launch's block size: 128 (fused kernel) or 256 (two-pass kernels)
  std::vector<std::vector<char>> stacks;
  ucontext_t scheduler;
  std::vector<unsigned char> smem;  // 16-byte aligned view below
  unsigned char* smem_base = nullptr;
  size_t smem_size = 0;
  int64_t block = 0;
  int current = 0;
  std::function<void()> body;
  std::string error;
  std::vector<std::pair<const unsigned char*, const unsigned char*>> sources;  // where cp.async may read
  std::vector<int> order;  // the order in which runnable threads are resumed
};

Cta* g_cta = nullptr;

void fail(const std::string& message) {
  if (g_cta->error.empty()) g_cta->error = message;
}

void suspend(Wait wait) {
  Thread& self = g_cta->threads[g_cta->current];
  self.wait = wait;
  swapcontext(&self.context, &g_cta->scheduler);
}

void trampoline() {
  g_cta->body();
  Thread& self = g_cta->threads[g_cta->current];
  for (const auto& group : self.copies)
    if (!group.empty()) fail("a thread exited with cp.async copies it never waited for");
  self.wait = Wait::kDone;
  swapcontext(&g_cta->threads[g_cta->current].context, &g_cta->scheduler);
}

bool in_smem(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= g_cta->smem_base && c + bytes <= g_cta->smem_base + g_cta->smem_size;
}

float half_bits_to_float(uint16_t h, bool bf16) {
  if (bf16) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  __half value;
  std::memcpy(&value, &h, sizeof h);
  return __half2float(value);
}

void run_ldmatrix(Thread* warp) {
  for (int lane = 0; lane < 32; ++lane) {
    const void* row = warp[lane].address;
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
    if (!in_smem(row, 16)) fail("ldmatrix row outside shared memory");
    if (warp[lane].trans != warp[0].trans) fail("ldmatrix .trans differs across the warp");
  }
  if (!g_cta->error.empty()) return;
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2, quad = lane & 3;
    for (int q = 0; q < 4; ++q) {
      uint32_t packed = 0;
      for (int e = 0; e < 2; ++e) {
        const int source = 8 * q + (warp[0].trans ? 2 * quad + e : group);
        const int element = warp[0].trans ? group : 2 * quad + e;
        uint16_t bits;
        std::memcpy(&bits, static_cast<const unsigned char*>(warp[source].address) + 2 * element, 2);
        packed |= static_cast<uint32_t>(bits) << (16 * e);
      }
      warp[lane].registers[q] = packed;
    }
  }
}

// D = A B + C for m16n8k16 with the PTX fragment layouts (a_i, b_i, c_i as in trd_cpu.cpp's emulate_mma).
void run_mma(Thread* warp) {
  float am[16][16], bm[16][8], cm[16][8];
  const bool bf16 = warp[0].bf16;
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2, quad = lane & 3;
    for (int i = 0; i < 8; ++i) {
      const uint16_t bits = static_cast<uint16_t>(warp[lane].a[i / 2] >> (16 * (i % 2)));
      am[group + 8 * ((i / 2) % 2)][2 * quad + (i % 2) + 8 * (i / 4)] = half_bits_to_float(bits, bf16);
    }
    for (int i = 0; i < 4; ++i) {
      const uint32_t reg = i < 2 ? warp[lane].b0 : warp[lane].b1;
      const uint16_t bits = static_cast<uint16_t>(reg >> (16 * (i % 2)));
      bm[2 * quad + (i % 2) + 8 * (i / 2)][group] = half_bits_to_float(bits, bf16);
    }
    for (int i = 0; i < 4; ++i) cm[group + 8 * (i / 2)][2 * quad + i % 2] = warp[lane].d[i];
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2, quad = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = group + 8 * (i / 2), col = 2 * quad + i % 2;
      float sum = cm[row][col];
      for (int k = 0; k < 16; ++k) sum = std::fmaf(am[row][k], bm[k][col], sum);
      warp[lane].d[i] = sum;
    }
  }
}

void run_shuffle(Thread* warp) {
  for (int lane = 0; lane < 32; ++lane) warp[lane].shuffled = warp[lane ^ warp[lane].offset].value;
}

std::string describe_states() {
  std::string out;
  for (int w = 0; w < static_cast<int>(g_cta->threads.size()) / 32; ++w) {
    out += " warp " + std::to_string(w) + ":";
    for (int lane = 0; lane < 32; ++lane) {
      const Wait s = g_cta->threads[32 * w + lane].wait;
      out += s == Wait::kRunnable ? 'r' : s == Wait::kWarp ? 'w' : s == Wait::kBlock ? 'b' : 'd';
    }
  }
  return out;
}

void run_cta(int64_t block, const std::function<void()>& body) {
  Cta& cta = *g_cta;
  cta.block = block;
  cta.body = body;
  std::memset(cta.smem_base, 0xff, cta.smem_size);  // uninitialised shared memory reads as NaN
  for (size_t t = 0; t < cta.threads.size(); ++t) {
    Thread& th = cta.threads[t];
    th = Thread();
    getcontext(&th.context);
    th.context.uc_stack.ss_sp = cta.stacks[t].data();
    th.context.uc_stack.ss_size = kStackBytes;
    th.context.uc_link = nullptr;
    makecontext(&th.context, trampoline, 0);
  }
  while (true) {
    bool progress = false;
    for (int t : cta.order) {
      if (cta.threads[t].wait != Wait::kRunnable) continue;
      cta.current = t;
      swapcontext(&cta.scheduler, &cta.threads[t].context);
      progress = true;
    }
    const int threads = static_cast<int>(cta.threads.size());
    for (int w = 0; w < threads / 32; ++w) {
      Thread* warp = cta.threads.data() + 32 * w;
      bool all = true;
      for (int lane = 0; lane < 32; ++lane) all = all && warp[lane].wait == Wait::kWarp;
      if (!all) continue;
      for (int lane = 0; lane < 32; ++lane)
        if (warp[lane].op != warp[0].op) fail("lanes of warp " + std::to_string(w) + " wait at different collectives");
      if (!cta.error.empty()) return;
      if (warp[0].op == Op::kLdmatrix) run_ldmatrix(warp);
      if (warp[0].op == Op::kMma) run_mma(warp);
      if (warp[0].op == Op::kShuffle) run_shuffle(warp);
      if (!cta.error.empty()) return;
      for (int lane = 0; lane < 32; ++lane) warp[lane].wait = Wait::kRunnable;
      progress = true;
    }
    int at_block = 0, done = 0;
    for (const Thread& th : cta.threads) {
      at_block += th.wait == Wait::kBlock;
      done += th.wait == Wait::kDone;
    }
    if (done == threads) return;
    if (at_block == threads) {
      int any = 0;
      for (const Thread& th : cta.threads) any |= th.predicate != 0;
      for (Thread& th : cta.threads) {
        th.reduced = any;
        th.wait = Wait::kRunnable;
      }
      progress = true;
    } else if (at_block > 0 && at_block + done == threads) {
      fail("some threads exited while others wait at a barrier:" + describe_states());
      return;
    }
    if (!progress) {
      fail("deadlock (r=runnable w=warp collective b=barrier d=done):" + describe_states());
      return;
    }
  }
}

}  // namespace

int thread_id() { return g_cta->current; }
int64_t block_id() { return g_cta->block; }
unsigned char* dynamic_smem() { return g_cta->smem_base; }

void block_sync() { block_sync_or(0); }

int block_sync_or(int predicate) {
  Thread& self = g_cta->threads[g_cta->current];
  self.predicate = predicate;
  suspend(Wait::kBlock);
  return g_cta->threads[g_cta->current].reduced;
}

double warp_shfl_xor(double value, int offset) {
  Thread& self = g_cta->threads[g_cta->current];
  self.op = Op::kShuffle;
  self.value = value;
  self.offset = offset;
  suspend(Wait::kWarp);
  return g_cta->threads[g_cta->current].shuffled;
}

void ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans) {
  Thread& self = g_cta->threads[g_cta->current];
  self.op = Op::kLdmatrix;
  self.address = p;
  self.trans = trans;
  self.registers = r;
  suspend(Wait::kWarp);
}

void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  Thread& self = g_cta->threads[g_cta->current];
  self.op = Op::kMma;
  self.d = d;
  self.a = a;
  self.b0 = b0;
  self.b1 = b1;
  self.bf16 = bf16;
  suspend(Wait::kWarp);
}

void copy_16(void* smem_dst, const void* global_src) {
  if (reinterpret_cast<uintptr_t>(smem_dst) % 16 || reinterpret_cast<uintptr_t>(global_src) % 16)
    fail("cp.async with an address that is not 16-byte aligned");
  if (!in_smem(smem_dst, 16)) fail("cp.async destination outside shared memory");
  // The source must lie inside one of the launch's inputs.
  const auto* p = static_cast<const unsigned char*>(global_src);
  bool inside = false;
  for (const auto& range : g_cta->sources) inside = inside || (p >= range.first && p + 16 <= range.second);
  if (!inside) fail("cp.async source outside the inputs");
  if (g_cta->error.empty()) g_cta->threads[g_cta->current].copies.back().emplace_back(smem_dst, global_src);
}

void misaligned(const char* what) { fail(std::string(what) + " with a misaligned address"); }

void copy_commit() { g_cta->threads[g_cta->current].copies.emplace_back(); }

void copy_wait(int pending) {
  auto& groups = g_cta->threads[g_cta->current].copies;
  // groups.back() is the open (uncommitted) group; retire all committed groups but the newest `pending`.
  const int committed = static_cast<int>(groups.size()) - 1;
  const int retire = committed - pending;
  for (int g = 0; g < retire; ++g)
    for (const auto& copy : groups[static_cast<size_t>(g)]) std::memcpy(copy.first, copy.second, 16);
  if (retire > 0) groups.erase(groups.begin(), groups.begin() + retire);
}

}  // namespace emu

namespace {

// The bytes of rows [0, n) of a [batch, n, dim] tensor: where cp.async may read.
std::pair<const unsigned char*, const unsigned char*> rows_range(const void* base, int64_t batch, int64_t n,
                                                                 int64_t stride_b, int64_t stride_n, int64_t dim,
                                                                 int element_size) {
  const auto* lo = static_cast<const unsigned char*>(base);
  return {lo, lo + ((batch - 1) * stride_b + (n - 1) * stride_n + dim) * element_size};
}

// Runs `blocks` CTAs of `threads` threads, each running kernel(); returns the first fault, or "".
// Resume order of runnable threads: 0 forward, 1 reverse, else shuffled with `order` as the seed. Code that
// reads another thread's shared-memory writes without a barrier between them fails in some order.
template <class Kernel>
std::string emulate_launch(int64_t blocks, int threads, size_t smem_bytes, int order,
                           std::vector<std::pair<const unsigned char*, const unsigned char*>> sources,
                           const Kernel& kernel) {
  emu::Cta cta;
  cta.threads.resize(static_cast<size_t>(threads));
  for (int t = 0; t < threads; ++t) cta.order.push_back(order == 1 ? threads - 1 - t : t);
  if (order > 1) std::shuffle(cta.order.begin(), cta.order.end(), std::mt19937(static_cast<unsigned>(order)));
  cta.sources = std::move(sources);
  cta.stacks.assign(static_cast<size_t>(threads), std::vector<char>(emu::kStackBytes));
  cta.smem_size = smem_bytes;
  cta.smem.assign(cta.smem_size + 16, 0);
  const auto raw = reinterpret_cast<uintptr_t>(cta.smem.data());
  cta.smem_base = cta.smem.data() + (16 - raw % 16) % 16;
  emu::g_cta = &cta;
  for (int64_t block = 0; block < blocks && cta.error.empty(); ++block) emu::run_cta(block, kernel);
  emu::g_cta = nullptr;
  return cta.error;
}

std::vector<std::pair<const unsigned char*, const unsigned char*>> input_ranges(const TrdArgs& a, int dtype) {
  return {rows_range(a.s, a.batch, a.n, a.s_stride_b, a.s_stride_n, a.ds, dtype_size(dtype)),
          rows_range(a.t, a.batch, a.n, a.t_stride_b, a.t_stride_n, a.dt, dtype_size(dtype))};
}

template <class T>
std::string emulate(TrdArgs args, int dtype, int order) {
  return emulate_launch(launched_items(work_items(args.batch, args.n, args.splits), args.work_first, args.work_step),
                        kThreads, cuda::smem_bytes<T>(), order,
                        input_ranges(args, dtype), [&args] { cuda::trd_fused_pair_sums_kernel<T>(args); });
}

template <class T>
std::string emulate_relation_pass(TrdArgs args, int dtype, int order) {
  return emulate_launch(args.batch * map_tiles(args.n), kPassThreads, cuda::relation_smem_bytes<T>(), order,
                        input_ranges(args, dtype), [&args] { cuda::trd_relation_pass_kernel<T>(args); });
}

template <class T>
std::string emulate_gradient_pass(GradientPassArgs args, int dtype, int order) {
  const auto* map = reinterpret_cast<const unsigned char*>(args.map);
  std::vector<std::pair<const unsigned char*, const unsigned char*>> sources = {
      rows_range(args.x, args.batch, args.n, args.x_stride_b, args.x_stride_n, args.dim, dtype_size(dtype)),
      {map, map + args.batch * map_tiles(args.n) * kMapTileWords * sizeof(uint32_t)}};
  return emulate_launch(args.batch * map_side(args.n) * ceil_div(args.dim, kGradCols), kPassThreads,
                        cuda::gradient_smem_bytes<T>(), order, std::move(sources),
                        [&args] { cuda::trd_gradient_pass_kernel<T>(args); });
}

}  // namespace
}  // namespace vrepa

using namespace vrepa;

PYBIND11_MODULE(_C_emulator, m) {
  m.doc() = "The CUDA kernel's code run on the CPU by a warp/barrier emulator (tests only; tiny shapes).";
  def_pair_sums<int>(
      m, "The CUDA kernel on host memory, emulated; same arguments as _C_cuda.pair_sums, plus the thread order.",
      [](TrdArgs& args, int dtype, int order) {
        fill_alignment(args, dtype);
        std::string err;
        if (dtype == kFloat32) err = emulate<float>(args, dtype, order);
        if (dtype == kBFloat16) err = emulate<__nv_bfloat16>(args, dtype, order);
        if (dtype == kFloat16) err = emulate<__half>(args, dtype, order);
        if (!err.empty()) throw std::runtime_error("emulated kernel: " + err);
      },
      py::arg("order") = 0);
  def_plan(m, "(row_blocks, splits) for a launch.");
  def_relation_pass<int>(
      m, "The relation-pass kernel on host memory, emulated; same arguments as _C_cuda.relation_pass, plus the order.",
      [](TrdArgs& args, int dtype, int order) {
        std::string err;
        if (dtype == kFloat32) err = emulate_relation_pass<float>(args, dtype, order);
        if (dtype == kBFloat16) err = emulate_relation_pass<__nv_bfloat16>(args, dtype, order);
        if (dtype == kFloat16) err = emulate_relation_pass<__half>(args, dtype, order);
        if (!err.empty()) throw std::runtime_error("emulated relation pass: " + err);
      },
      py::arg("order") = 0);
  def_gradient_pass<int>(
      m, "The gradient-pass kernel on host memory, emulated; same arguments as _C_cuda.gradient_pass, plus the order.",
      [](GradientPassArgs& args, int dtype, int order) {
        std::string err;
        if (dtype == kFloat32) err = emulate_gradient_pass<float>(args, dtype, order);
        if (dtype == kBFloat16) err = emulate_gradient_pass<__nv_bfloat16>(args, dtype, order);
        if (dtype == kFloat16) err = emulate_gradient_pass<__half>(args, dtype, order);
        if (!err.empty()) throw std::runtime_error("emulated gradient pass: " + err);
      },
      py::arg("order") = 0);
}
