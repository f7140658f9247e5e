// The CUDA kernel's host entry point, shared by ademamix_kernel.cu (definition) and
// ademamix_cuda.cpp (the op's CUDA implementation). Plain types only.
#pragma once

#include <cuda_runtime_api.h>

#include "ademamix.h"

namespace ademamix {

enum class ParamDtype { kFloat32, kBFloat16, kFloat16 };

struct LaunchArgs {
  ParamDtype dtype;
  bool has_m1;
  LaunchPlan plan;   // in device memory
  int64_t n_chunks;  // grid size, <= INT32_MAX (checked by the caller)
  HyperParams hyper;
  ScalarPtrs scalars;  // null pointers select the variants without them
};

// Enqueues the whole step (all tensors, step counts included) as one kernel on `stream`.
void launch_ademamix_step(const LaunchArgs& args, cudaStream_t stream);

}  // namespace ademamix
