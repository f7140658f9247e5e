// The CUDA kernel's host entry point, shared by ademamix_kernel.cu (definition) and
// ademamix_cuda.cpp (the op's CUDA implementation). Plain types only.
#pragma once

#include <cuda_runtime_api.h>

#include "ademamix.h"

namespace ademamix {

// Enqueues the whole step (all tensors, step counts included) as one kernel on `stream`.
void launch_ademamix_step(const LaunchArgs& args, cudaStream_t stream);

// Enqueues the gradient norm's partials of a norm plan (args: dtype, plan, n_chunks), one per
// chunk into `partials`, as one kernel on `stream`.
void launch_norm_partials(const LaunchArgs& args, bool inf_norm, float* partials,
                          cudaStream_t stream);

}  // namespace ademamix
