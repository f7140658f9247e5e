// The CUDA kernel: one launch per step, one block per chunk of the plan. Includes stay lean
// (no ATen): the op's checks, plan cache and registration live in ademamix_cuda.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <c10/cuda/CUDAException.h>

#include "ademamix.h"
#include "ademamix_launch.h"

namespace ademamix {

// Explicit round-to-nearest-even conversions (torch builds with the implicit ones disabled).
template <>
struct Cast<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
};

template <>
struct Cast<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

namespace {

// ptxas gives the kernels 74-80 registers, so 3 blocks of 256 threads fit an SM (65536
// registers); the bound keeps it that way. 768 threads, each with kUnroll x 5 16-byte loads in
// flight, keep HBM3 busy.
constexpr int kMinBlocksPerSm = 3;

// The threads of a real CUDA block (see step_block).
struct CudaBlock {
  template <class F>
  __device__ __forceinline__ void for_each_thread(int /*n_busy*/, F&& f) const {
    f(static_cast<int>(threadIdx.x));
  }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  __device__ __forceinline__ bool leader() const { return threadIdx.x == 0; }
  template <class F>
  __device__ __forceinline__ StepScalars scalars(F&& compute) const {
    return compute();
  }
};

template <class V>
__global__ void __launch_bounds__(kBlockSize, kMinBlocksPerSm)
    ademamix_step_kernel(LaunchPlan plan, HyperParams h, ScalarPtrs d) {
  CudaBlock block;
  step_block<V>(plan, blockIdx.x, h, d, block);
}

}  // namespace

void launch_ademamix_step(const LaunchArgs& args, cudaStream_t stream) {
  dispatch_launch<float, __nv_bfloat16, __half>(args, [&](auto v) {
    using V = decltype(v);
    ademamix_step_kernel<V><<<static_cast<unsigned>(args.n_chunks), kBlockSize, 0, stream>>>(
        args.plan, args.hyper, args.scalars);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace ademamix
