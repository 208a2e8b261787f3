// One input dtype per translation unit, so that the instantiations compile in parallel.
#include "trd_kernel.cuh"
#include "trd_two_pass.cuh"

namespace vrepa {
namespace cuda {
VREPA_INSTANTIATE(__nv_bfloat16)
VREPA_INSTANTIATE_TWO_PASS(__nv_bfloat16)
}  // namespace cuda
}  // namespace vrepa
