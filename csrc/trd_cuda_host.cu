// Host-side dispatch of the CUDA kernels by dtype, device checks and version queries.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "trd_cuda_host.h"

namespace vrepa {
namespace cuda {
// Defined and explicitly instantiated in trd_kernel_{f32,bf16,f16}.cu.
template <class T>
cudaError_t launch_pair_sums(const TrdArgs& args, cudaStream_t stream);
template <class T>
cudaError_t kernel_attributes(cudaFuncAttributes* attributes);
template <class T>
cudaError_t launch_relation_pass(const TrdArgs& args, cudaStream_t stream);
template <class T>
cudaError_t launch_gradient_pass(const GradientPassArgs& args, cudaStream_t stream);
template <class T>
cudaError_t two_pass_attributes(cudaFuncAttributes* relation, cudaFuncAttributes* gradient);
}  // namespace cuda

namespace {
std::string describe(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}
}  // namespace

std::string cuda_pair_sums(TrdArgs args, int dtype, int device, uintptr_t stream) {
  fill_alignment(args, dtype);
  const std::string bad = check_args(args, dtype);
  if (!bad.empty()) return bad;
  int current = -1;
  cudaError_t err = cudaGetDevice(&current);
  if (err != cudaSuccess) return "cudaGetDevice failed: " + describe(err);
  if (current != device)
    return "the current CUDA device is " + std::to_string(current) + " but the tensors are on device " +
           std::to_string(device);
  auto handle = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: err = cuda::launch_pair_sums<float>(args, handle); break;
    case kBFloat16: err = cuda::launch_pair_sums<__nv_bfloat16>(args, handle); break;
    default: err = cuda::launch_pair_sums<__half>(args, handle); break;
  }
  if (err != cudaSuccess) return "kernel launch failed: " + describe(err);
  return std::string();
}

namespace {
std::string check_device(int device) {
  int current = -1;
  const cudaError_t err = cudaGetDevice(&current);
  if (err != cudaSuccess) return "cudaGetDevice failed: " + describe(err);
  if (current != device)
    return "the current CUDA device is " + std::to_string(current) + " but the tensors are on device " +
           std::to_string(device);
  return std::string();
}
}  // namespace

std::string cuda_relation_pass(const TrdArgs& args, int dtype, int device, uintptr_t stream) {
  const std::string bad = check_device(device);
  if (!bad.empty()) return bad;
  auto handle = reinterpret_cast<cudaStream_t>(stream);
  cudaError_t err;
  switch (dtype) {
    case kFloat32: err = cuda::launch_relation_pass<float>(args, handle); break;
    case kBFloat16: err = cuda::launch_relation_pass<__nv_bfloat16>(args, handle); break;
    default: err = cuda::launch_relation_pass<__half>(args, handle); break;
  }
  if (err != cudaSuccess) return "relation-pass launch failed: " + describe(err);
  return std::string();
}

std::string cuda_gradient_pass(const GradientPassArgs& args, int dtype, int device, uintptr_t stream) {
  const std::string bad = check_device(device);
  if (!bad.empty()) return bad;
  auto handle = reinterpret_cast<cudaStream_t>(stream);
  cudaError_t err;
  switch (dtype) {
    case kFloat32: err = cuda::launch_gradient_pass<float>(args, handle); break;
    case kBFloat16: err = cuda::launch_gradient_pass<__nv_bfloat16>(args, handle); break;
    default: err = cuda::launch_gradient_pass<__half>(args, handle); break;
  }
  if (err != cudaSuccess) return "gradient-pass launch failed: " + describe(err);
  return std::string();
}

std::string cuda_device_problem(int device) {
  int driver = 0;
  cudaDriverGetVersion(&driver);
  if (driver == 0) return "no CUDA driver is installed";
  if (driver / 1000 < CUDART_VERSION / 1000)  // minor-version compatibility within a major release
    return "the CUDA driver supports CUDA " + std::to_string(driver / 1000) + "." + std::to_string(driver % 1000 / 10) +
           " but the extension was built with CUDA " + std::to_string(CUDART_VERSION / 1000) + "." +
           std::to_string(CUDART_VERSION % 1000 / 10) + "; rebuild it with an older nvcc or update the driver";
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) return "cudaGetDeviceCount failed: " + describe(err);
  if (device < 0 || device >= count) return "device " + std::to_string(device) + " does not exist";
  int previous = 0;
  cudaGetDevice(&previous);
  if (previous != device) cudaSetDevice(device);
  cudaFuncAttributes attributes, second;
  std::string problem;
  const cudaError_t errs[6] = {cuda::kernel_attributes<float>(&attributes),
                               cuda::kernel_attributes<__nv_bfloat16>(&attributes),
                               cuda::kernel_attributes<__half>(&attributes),
                               cuda::two_pass_attributes<float>(&attributes, &second),
                               cuda::two_pass_attributes<__nv_bfloat16>(&attributes, &second),
                               cuda::two_pass_attributes<__half>(&attributes, &second)};
  for (cudaError_t e : errs)
    if (e != cudaSuccess && problem.empty()) problem = "the kernels cannot load on this device: " + describe(e);
  if (previous != device) cudaSetDevice(previous);
  cudaGetLastError();  // clear a sticky-free error left by the probe
  return problem;
}

int cuda_multiprocessor_count(int device, std::string* error) {
  int count = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) {
    if (error != nullptr) *error = describe(err);
    return -1;
  }
  return count;
}

int cuda_runtime_version() { return CUDART_VERSION; }

int cuda_driver_version() {
  int driver = 0;
  cudaDriverGetVersion(&driver);
  return driver;
}

}  // namespace vrepa
