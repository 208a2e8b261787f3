// One input dtype per translation unit, so that the instantiations compile in parallel.
#include "trd_kernel.cuh"

namespace vrepa {
namespace cuda {
VREPA_INSTANTIATE(float)
}  // namespace cuda
}  // namespace vrepa
