// The CUDA implementation of ademamix::step_: checks, the cached device plan, one launch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <cstring>
#include <vector>

#include "ademamix.h"
#include "ademamix_launch.h"
#include "ademamix_ops.h"

namespace ademamix {
namespace {

bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// A buffer written while a CUDA graph is being captured: device memory, and the pinned host copy
// that the graph's memcpy node reads at every replay. Both come from cudaMalloc / cudaHostAlloc,
// outside the caching allocator and so outside the capture's private pool, which CUDA-graph
// trees (torch.compile mode="reduce-overhead") may hand to other tensors. They are freed with
// the tensor, which the plan caches never do for a buffer a graph reads.
struct GraphUpload {
  at::Tensor buffer;
  const void* host;  // what the graph uploads; eager users must upload it themselves first
};

template <class Fill>
GraphUpload upload_in_graph(size_t bytes, const at::Device& device, cudaStream_t stream,
                            Fill&& fill) {
  void* dev = nullptr;
  void* host = nullptr;
  // The stricter capture modes refuse allocations during a capture; they are no stream work.
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  cudaError_t err = cudaMalloc(&dev, bytes);
  if (err == cudaSuccess) {
    err = cudaHostAlloc(&host, bytes, cudaHostAllocDefault);
    if (err != cudaSuccess) {
      (void)cudaFree(dev);
    }
  }
  C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  C10_CUDA_CHECK(err);
  fill(host);
  at::Tensor buffer = at::from_blob(
      dev, {static_cast<int64_t>(bytes)},
      [host](void* p) {
        (void)cudaFree(p);
        (void)cudaFreeHost(host);
      },
      at::TensorOptions().dtype(at::kByte).device(device));
  C10_CUDA_CHECK(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, stream));
  return GraphUpload{buffer, host};
}

// A device plan. Built eagerly, it lives in the caching allocator like any tensor; built during
// a capture, it is a GraphUpload, and `pending` holds its host copy until an eager call has
// uploaded it (the graph's own copy runs only at its replays, which may come later or never).
struct CudaPlan {
  std::vector<uintptr_t> words;
  size_t hash;
  bool keep;  // a CUDA graph reads it: never evicted
  PlanView plan;
  size_t bytes;
  cudaStream_t stream;  // the stream that built it
  const void* pending;  // non-null: the device copy may not have been written yet
  PlanView view() const { return plan; }
};

CudaPlan make_cuda_plan(const PlanKey& key, size_t hash, const at::Device& device,
                        const c10::cuda::CUDAStream& stream, bool capturing) {
  const Plan plan = build_plan(key);
  const size_t bytes = plan.bytes();
  CudaPlan e{key.words, hash, capturing, PlanView{}, bytes, stream.stream(), nullptr};
  e.plan.n_chunks = static_cast<int64_t>(plan.chunks.size());
  e.plan.chunks_offset = plan.chunks_offset();
  e.plan.counters_offset = plan.counters_offset();
  if (capturing) {
    GraphUpload up = upload_in_graph(bytes, device, stream.stream(),
                                     [&](void* host) { plan.serialize(host); });
    e.plan.buffer = up.buffer;
    e.pending = up.host;
  } else {
    const auto bytes_options = at::TensorOptions().dtype(at::kByte);
    e.plan.buffer = at::empty({static_cast<int64_t>(bytes)}, bytes_options.device(device));
    // torch's pinned allocator keeps the staging buffer from reuse until the copy has run,
    // so it can be dropped right away without a sync.
    at::Tensor host = at::empty({static_cast<int64_t>(bytes)}, bytes_options.pinned_memory(true));
    plan.serialize(host.data_ptr());
    e.plan.buffer.copy_(host, /*non_blocking=*/true);
  }
  return e;
}

void use_cuda_plan(CudaPlan& e, const c10::cuda::CUDAStream& stream, bool capturing) {
  if (capturing) {
    e.keep = true;  // the graph reads e.plan.buffer at every replay
    if (e.pending != nullptr) {
      // Not known to be written: this graph uploads it too (it may be replayed without the
      // graph that built the plan).
      C10_CUDA_CHECK(cudaMemcpyAsync(e.plan.buffer.data_ptr(), e.pending, e.bytes,
                                     cudaMemcpyHostToDevice, stream.stream()));
    }
    return;
  }
  if (e.pending != nullptr) {
    C10_CUDA_CHECK(cudaMemcpyAsync(e.plan.buffer.data_ptr(), e.pending, e.bytes,
                                   cudaMemcpyHostToDevice, stream.stream()));
    e.pending = nullptr;
  }
  if (e.stream != stream.stream()) {
    // Freeing the buffer later must wait for this stream's use of it too (a no-op for the
    // buffers of graph plans, which the caching allocator does not own).
    c10::cuda::CUDACachingAllocator::recordStream(e.plan.buffer.storage().data_ptr(), stream);
  }
}

PlanCache<CudaPlan>& plan_cache() {
  static auto* cache = new PlanCache<CudaPlan>();  // leaked: no CUDA frees during interpreter exit
  return *cache;
}

// The device plan of `key` for a launch on the current stream of `device` (the caller holds a
// CUDAGuard for it).
PlanView cuda_plan(const PlanKey& key, const at::Device& device,
                   const c10::cuda::CUDAStream& stream) {
  const bool capturing = stream_is_capturing(stream.stream());
  return plan_cache().get(
      key, [&](size_t hash) { return make_cuda_plan(key, hash, device, stream, capturing); },
      [&](CudaPlan& e) { use_cuda_plan(e, stream, capturing); });
}

void step_cuda(const StepArgs& a) {
  thread_local PlanKey key;  // keeps its capacity from call to call
  if (!check_step_args(a, c10::DeviceType::CUDA, key)) {
    return;
  }
  const at::Device device = a.lists[kParamIdx][0].device();
  const c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const PlanView plan = cuda_plan(key, device, stream);
  launch_ademamix_step(launch_args(a, key, plan), stream.stream());
}

// ademamix::grad_norm_partials: one partial of the gradient norm per chunk of the grads.
at::Tensor norm_partials_cuda(at::TensorList grads, bool inf_norm) {
  thread_local PlanKey key;
  TORCH_CHECK(check_norm_args(grads, c10::DeviceType::CUDA, key),
              "ademamix::grad_norm_partials: no grads");
  const at::Device device = grads[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const PlanView plan = cuda_plan(key, device, stream);
  at::Tensor partials = new_partials(plan, device);
  launch_norm_partials(norm_launch_args(grads, plan), inf_norm, partials.data_ptr<float>(),
                       stream.stream());
  return partials;
}

// For the Triton backend's tables built during a capture: `host` (a CPU tensor) copied into a
// GraphUpload on the current stream of `device`. The caller keeps `host` and uploads it itself
// before an eager use.
at::Tensor upload_in_graph_op(const at::Tensor& host, at::Device device) {
  TORCH_CHECK(host.device().is_cpu() && host.is_contiguous(), "ademamix::_upload_in_graph: ",
              "host must be a contiguous CPU tensor");
  TORCH_CHECK(device.is_cuda(), "ademamix::_upload_in_graph: device must be a CUDA device");
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const size_t bytes = host.nbytes();
  at::Tensor buffer = upload_in_graph(bytes, device, stream, [&](void* dst) {
                        std::memcpy(dst, host.const_data_ptr(), bytes);
                      }).buffer;
  return buffer.view(host.scalar_type()).view(host.sizes());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ademamix, m) {
  m.def("_upload_in_graph(Tensor host, Device device) -> Tensor", TORCH_FN(upload_in_graph_op));
}

TORCH_LIBRARY_IMPL(ademamix, CUDA, m) {
  m.impl("step_", TORCH_FN((step_op<step_cuda, double>)));
  m.impl("step_.tensor_lr", TORCH_FN((step_op<step_cuda, const at::Tensor&>)));
  m.impl("grad_norm_partials", TORCH_FN(norm_partials_cuda));
}

}  // namespace ademamix
