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
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v, uint32_t /*random*/) {
    return __float2bfloat16_rn(v);
  }
};

template <>
struct Cast<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v, uint32_t /*random*/) {
    return __float2half_rn(v);
  }
};

namespace {

// ptxas gives the kernels 74-80 registers, so 3 blocks of 256 threads fit an SM (65536
// registers); the bound keeps it that way. 768 threads, each with kUnroll x 5 16-byte loads in
// flight, keep HBM3 busy.
constexpr int kMinBlocksPerSm = 3;
// The variants with 8-bit states hold a lane's 8 new values of each state in registers until the
// block's absmax is reduced over the warp: 2 blocks (128 registers) keep them out of local memory,
// and 16 warps per SM, each with 88 B per lane in flight, still cover HBM's latency.
constexpr int kMinBlocksPerSmQuant = 2;

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
  // Warp w takes blocks w, w + kWarps, ...: its 32 lanes hold the block's kQBlock elements, and
  // the absmax is a butterfly over them (the loop bound is the same for all lanes of a warp).
  template <class Update, class Store>
  __device__ __forceinline__ void quant_blocks(int n_qblocks, Update&& update,
                                               Store&& store) const {
    static_assert(kQLanes == 32, "one warp per block");
    constexpr int kWarps = kBlockSize / 32;
    const int lane = static_cast<int>(threadIdx.x) % 32;
    for (int qb = static_cast<int>(threadIdx.x) / 32; qb < n_qblocks; qb += kWarps) {
      QLaneValues v;
      update(qb, lane, v);
      float amax[3] = {v.amax[0], v.amax[1], v.amax[2]};
      ADEMAMIX_UNROLL
      for (int offset = 16; offset > 0; offset /= 2) {
        ADEMAMIX_UNROLL
        for (int k = 0; k < 3; ++k) {
          amax[k] = norm_combine<true>(amax[k], __shfl_xor_sync(0xffffffffu, amax[k], offset));
        }
      }
      store(qb, lane, v, amax);
    }
  }
};

template <class V>
__global__ void __launch_bounds__(kBlockSize, V::kQuant ? kMinBlocksPerSmQuant : kMinBlocksPerSm)
    ademamix_step_kernel(LaunchPlan plan, HyperParams h, ScalarPtrs d) {
  CudaBlock block;
  step_block<V>(plan, blockIdx.x, h, d, block);
}

// One block per chunk of a norm plan: the chunk's partial of the gradient norm (see
// norm_combine), reduced over the block in a fixed order (the same bits at every run).
template <typename T, bool Inf>
__global__ void __launch_bounds__(kBlockSize)
    norm_partials_kernel(LaunchPlan plan, float* __restrict__ partials) {
  constexpr int kWarps = kBlockSize / 32;
  const ChunkRecord chunk = plan.chunks[blockIdx.x];
  const TensorRecord rec = plan.tensors[chunk.tensor];
  const int len = chunk_length(rec.numel, chunk.chunk);
  float acc = norm_chunk_share<T, Inf>(rec, chunk.chunk, len, threadIdx.x);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  ADEMAMIX_UNROLL
  for (int offset = 16; offset > 0; offset /= 2) {
    acc = norm_combine<Inf>(acc, __shfl_down_sync(0xffffffffu, acc, offset));
  }
  __shared__ float warp_acc[kWarps];
  if (lane == 0) {
    warp_acc[warp] = acc;
  }
  __syncthreads();
  if (warp == 0) {
    acc = lane < kWarps ? warp_acc[lane] : 0.0f;  // 0 is neutral for both partials
    ADEMAMIX_UNROLL
    for (int offset = 16; offset > 0; offset /= 2) {
      acc = norm_combine<Inf>(acc, __shfl_down_sync(0xffffffffu, acc, offset));
    }
    if (lane == 0) {
      partials[blockIdx.x] = acc;
    }
  }
}

}  // namespace

void launch_norm_partials(const LaunchArgs& args, bool inf_norm, float* partials,
                          cudaStream_t stream) {
  dispatch_dtype<float, __nv_bfloat16, __half>(args.dtype, [&](auto param) {
    with_bool(inf_norm, [&](auto inf) {
      norm_partials_kernel<decltype(param), decltype(inf)::value>
          <<<static_cast<unsigned>(args.n_chunks), kBlockSize, 0, stream>>>(args.plan, partials);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void launch_ademamix_step(const LaunchArgs& args, cudaStream_t stream) {
  dispatch_launch<float, __nv_bfloat16, __half>(args, [&](auto v) {
    using V = decltype(v);
    ademamix_step_kernel<V><<<static_cast<unsigned>(args.n_chunks), kBlockSize, 0, stream>>>(
        args.plan, args.hyper, args.scalars);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace ademamix
