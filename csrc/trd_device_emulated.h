// Device primitives of the kernel emulated on the CPU (trd_emulator.cpp), under the names that
// trd_device_cuda.cuh gives the GPU versions. The 128 threads of a CTA run as coroutines on one OS thread;
// warp-collective operations (ldmatrix, mma.sync, shuffles) and barriers suspend a thread until every
// thread of its warp (block) has arrived, then run with PTX semantics. Deterministic, and it reports
// divergent collectives, misaligned accesses and shared-memory overruns instead of hanging.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#define VREPA_KERNEL void
#define VREPA_PASS_KERNEL(min_blocks) void

namespace vrepa {
namespace emu {

int thread_id();
int64_t block_id();
unsigned char* dynamic_smem();
void block_sync();
int block_sync_or(int predicate);
double warp_shfl_xor(double value, int offset);
void ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans);
void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);
// cp.async: queued per thread, copied when cp.async.wait_group retires its group (so a missing wait reads
// stale shared memory, as it may on the GPU); addresses checked.
void copy_16(void* smem_dst, const void* global_src);
void misaligned(const char* what);  // records the fault; the call fails after the CTA
void copy_commit();
void copy_wait(int pending);

}  // namespace emu

namespace cuda {

inline int thread_id() { return emu::thread_id(); }
inline int64_t block_id() { return emu::block_id(); }
inline void block_sync() { emu::block_sync(); }
inline int block_sync_or(int predicate) { return emu::block_sync_or(predicate); }
inline double warp_shfl_xor(double value, int offset) { return emu::warp_shfl_xor(value, offset); }
inline void atomic_add(float* address, float value) { *address += value; }  // one OS thread: no race
inline void atomic_add2(float* address, float a, float b) {
  if (reinterpret_cast<uintptr_t>(address) % 8 != 0) emu::misaligned("vector atomic");
  address[0] += a;
  address[1] += b;
}
inline unsigned char* dynamic_smem() { return emu::dynamic_smem(); }

inline void cp_async_16(void* smem_dst, const void* global_src) { emu::copy_16(smem_dst, global_src); }
inline void cp_async_commit() { emu::copy_commit(); }
template <int kPending>
inline void cp_async_wait() {
  emu::copy_wait(kPending);
}

inline void ldsm_x4(uint32_t (&r)[4], const void* p) { emu::ldmatrix_x4(r, p, false); }
inline void ldsm_x4_trans(uint32_t (&r)[4], const void* p) { emu::ldmatrix_x4(r, p, true); }
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __nv_bfloat16) {
  emu::mma_16816(d, a, b0, b1, true);
}
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __half) {
  emu::mma_16816(d, a, b0, b1, false);
}

}  // namespace cuda
}  // namespace vrepa
