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

// Up to 4 resident blocks per SM (64 registers a thread at most): 1024 threads with 10 16-byte
// loads each in flight is far more than HBM3 needs to stay busy.
constexpr int kMinBlocksPerSm = 3;

template <class V>
__global__ void __launch_bounds__(kBlockSize, kMinBlocksPerSm)
    ademamix_step_kernel(const TensorRecord* __restrict__ tensors,
                         const ChunkRecord* __restrict__ chunks,
                         uint32_t* __restrict__ chunk_counters, HyperParams h, ScalarPtrs d) {
  if (skip_step<V>(d)) {
    return;  // every block returns: no update, no step increment, counters untouched
  }
  const ChunkRecord chunk = chunks[blockIdx.x];
  const TensorRecord rec = tensors[chunk.tensor];
  // Every block of a tensor reads the OLD step; the last of them to finish writes old + 1.
  float* const step = assume_global(rec.step);
  const float old_step = *step;
  const StepScalars s = step_scalars<V>(h, d, old_step + 1.0f);
  update_chunk_share<V>(rec, chunk.chunk, threadIdx.x, h, s);

  __syncthreads();  // all threads of this block have read the step
  if (threadIdx.x == 0) {
    const int64_t n_chunks = num_chunks(rec.numel);
    bool last = true;
    if (n_chunks > 1) {
      // Fence-atomic-fence: the block that completes the count sees every other block of the
      // tensor done with its read of the step, then resets the counter for the next launch
      // (so a CUDA graph can replay the kernel).
      __threadfence();
      const uint32_t done = atomicAdd(&chunk_counters[chunk.tensor], 1u);
      last = done == static_cast<uint32_t>(n_chunks - 1);
      if (last) {
        __threadfence();
        chunk_counters[chunk.tensor] = 0u;
      }
    }
    if (last) {
      *step = old_step + 1.0f;
    }
  }
}

template <typename T>
void launch_typed(const LaunchArgs& a, cudaStream_t stream) {
  dispatch_variant<T>(a.has_m1, a.scalars.grad_scale != nullptr, a.scalars.found_inf != nullptr,
                      a.scalars.lr != nullptr, [&](auto v) {
                        using V = decltype(v);
                        ademamix_step_kernel<V>
                            <<<static_cast<unsigned>(a.n_chunks), kBlockSize, 0, stream>>>(
                                a.tensors, a.chunks, a.chunk_counters, a.hyper, a.scalars);
                        C10_CUDA_KERNEL_LAUNCH_CHECK();
                      });
}

}  // namespace

void launch_ademamix_step(const LaunchArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case ParamDtype::kFloat32:
      launch_typed<float>(args, stream);
      break;
    case ParamDtype::kBFloat16:
      launch_typed<__nv_bfloat16>(args, stream);
      break;
    case ParamDtype::kFloat16:
      launch_typed<__half>(args, stream);
      break;
  }
}

}  // namespace ademamix
