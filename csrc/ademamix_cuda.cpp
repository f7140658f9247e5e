// The CUDA implementation of ademamix::step_: checks, the cached device plan, one launch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <list>
#include <mutex>
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

// Pinned memory for a plan uploaded while a CUDA graph is being captured. The graph's memcpy
// node re-reads it at every replay, so it is never freed. Allocating pinned memory is no
// stream operation, but the stricter capture modes may refuse it: relax the mode around it.
void* alloc_pinned_for_graph(size_t bytes) {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  void* ptr = nullptr;
  const cudaError_t err = cudaHostAlloc(&ptr, bytes, cudaHostAllocDefault);
  C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  C10_CUDA_CHECK(err);
  return ptr;
}

// Device copies of plans, keyed by everything a plan is made of (PlanKey: the device and, per
// tensor, five data pointers, the step pointer and numel), compared in full; the hash only
// short-cuts. A training loop reuses the same tensors every step: one build and upload.
class PlanCache {
 public:
  struct Handle {
    at::Tensor buffer;  // holds the device plan alive until the launch is enqueued
    int64_t n_chunks;
    size_t chunks_offset, counters_offset;
  };

  Handle get(const PlanKey& key, const at::Device& device, const c10::cuda::CUDAStream& stream) {
    const size_t hash = key.hash();
    const bool capturing = stream_is_capturing(stream.stream());
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->hash != hash || it->key != key.words) {
        continue;
      }
      entries_.splice(entries_.begin(), entries_, it);  // most recently used first
      Entry& e = entries_.front();
      if (capturing) {
        e.used_by_graph = true;  // the graph reads e.buffer at every replay: never evict
      } else if (e.stream != stream.stream()) {
        // Freeing the buffer later must wait for this stream's use of it too.
        c10::cuda::CUDACachingAllocator::recordStream(e.buffer.storage().data_ptr(), stream);
      }
      return e.handle();
    }
    entries_.push_front(make_entry(key, hash, device, stream, capturing));
    evict();
    return entries_.front().handle();
  }

 private:
  struct Entry {
    std::vector<uintptr_t> key;
    size_t hash;
    at::Tensor buffer;
    cudaStream_t stream;  // the stream that allocated and uploaded it
    bool used_by_graph;
    int64_t n_chunks;
    size_t chunks_offset, counters_offset;
    Handle handle() const { return Handle{buffer, n_chunks, chunks_offset, counters_offset}; }
  };

  // Plans held apart from those a CUDA graph uses (which are never evicted).
  static constexpr size_t kMaxEvictable = 16;

  static Entry make_entry(const PlanKey& key, size_t hash, const at::Device& device,
                          const c10::cuda::CUDAStream& stream, bool capturing) {
    const Plan plan = build_plan(key);
    const size_t bytes = plan.bytes();
    const auto bytes_options = at::TensorOptions().dtype(at::kByte);
    Entry e{key.words,
            hash,
            at::empty({static_cast<int64_t>(bytes)}, bytes_options.device(device)),
            stream.stream(),
            capturing,
            static_cast<int64_t>(plan.chunks.size()),
            plan.chunks_offset(),
            plan.counters_offset()};
    if (capturing) {
      void* host = alloc_pinned_for_graph(bytes);
      plan.serialize(host);
      C10_CUDA_CHECK(cudaMemcpyAsync(e.buffer.data_ptr(), host, bytes, cudaMemcpyHostToDevice,
                                     stream.stream()));
    } else {
      // torch's pinned allocator keeps the staging buffer from reuse until the copy has run,
      // so it can be dropped right away without a sync.
      at::Tensor host =
          at::empty({static_cast<int64_t>(bytes)}, bytes_options.pinned_memory(true));
      plan.serialize(host.data_ptr());
      e.buffer.copy_(host, /*non_blocking=*/true);
    }
    return e;
  }

  void evict() {
    size_t evictable = 0;
    for (const Entry& e : entries_) {
      evictable += e.used_by_graph ? 0 : 1;
    }
    for (auto it = entries_.end(); evictable > kMaxEvictable && it != entries_.begin();) {
      --it;
      if (!it->used_by_graph) {
        it = entries_.erase(it);  // the caching allocator orders the free after queued work
        --evictable;
      }
    }
  }

  std::mutex mutex_;
  std::list<Entry> entries_;
};

PlanCache& plan_cache() {
  static PlanCache* cache = new PlanCache();  // leaked: no CUDA frees during interpreter exit
  return *cache;
}

ParamDtype param_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ParamDtype::kFloat32;
    case at::kBFloat16:
      return ParamDtype::kBFloat16;
    case at::kHalf:
      return ParamDtype::kFloat16;
    default:
      TORCH_CHECK(false, "ademamix::step_: unsupported param dtype ", t);
  }
}

void step_cuda(const StepArgs& a) {
  thread_local PlanKey key;  // keeps its capacity from call to call
  if (!check_step_args(a, c10::DeviceType::CUDA, key)) {
    return;
  }
  const at::Tensor& param0 = a.lists[kParamIdx][0];
  const c10::cuda::CUDAGuard guard(param0.device());
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(param0.device().index());
  const PlanCache::Handle plan = plan_cache().get(key, param0.device(), stream);
  char* base = static_cast<char*>(plan.buffer.data_ptr());
  LaunchArgs la;
  la.dtype = param_dtype(param0.scalar_type());
  la.has_m1 = !a.lists[kExpAvgFastIdx].empty();
  la.tensors = reinterpret_cast<const TensorRecord*>(base);
  la.chunks = reinterpret_cast<const ChunkRecord*>(base + plan.chunks_offset);
  la.chunk_counters = reinterpret_cast<uint32_t*>(base + plan.counters_offset);
  la.n_chunks = plan.n_chunks;
  la.hyper = make_hyper_params(a);
  la.scalars = make_scalar_ptrs(a);
  launch_ademamix_step(la, stream.stream());
}

}  // namespace

TORCH_LIBRARY_IMPL(ademamix, CUDA, m) {
  m.impl("step_", TORCH_FN((step_op<step_cuda, double>)));
  m.impl("step_.tensor_lr", TORCH_FN((step_op<step_cuda, const at::Tensor&>)));
}

}  // namespace ademamix
