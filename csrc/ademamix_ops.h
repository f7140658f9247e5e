// Host glue shared by the CPU implementation (ademamix_ops.cpp) and the CUDA implementation
// (ademamix_cuda.cpp) of ademamix::step_: the arguments, their checks, the hyperparameters as
// the kernels see them, and the plan (per-tensor and per-chunk records).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <list>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>

#include "ademamix.h"

namespace ademamix {

// The schema's arguments. lr is either a double or a 1-element fp32 tensor (tensor_lr overload).
struct StepArgs {
  at::TensorList lists[kNumLists];  // indexed by k*Idx
  at::TensorList state_steps;
  double lr;
  const at::Tensor* lr_tensor;  // null for the float-lr overload
  double beta1, beta2, beta3, alpha;
  std::optional<int64_t> beta3_warmup, alpha_warmup;
  double eps, weight_decay;
  bool maximize;
  const at::Tensor* grad_scale;  // null when absent
  const at::Tensor* found_inf;   // null when absent
  std::optional<int64_t> sr_seed;  // the random bits' seed: required with bf16 states or param_sr
  bool param_sr;                   // bf16 params written with stochastic rounding
  // 8-bit states: the absmax lists (m1, m2, nu), each empty or one tensor per param
  at::TensorList absmax[kNumAbsmaxLists];
};

// What a plan is made of, gathered while the arguments are checked (one pass over the
// tensors): the device, the param element size, the plan's kind, the unquantized state element
// size (4 or 2; 4 in a norm plan) and whether some tensor has 8-bit states, then per tensor its
// five data pointers (0 for an absent m1), its step pointer, numel, its three absmax pointers
// (0 unless quantized) and whether it is quantized. The plan caches compare keys in full. A norm
// plan (kind kNormPlan) holds only grads: the other pointers are 0.
struct PlanKey {
  static constexpr uintptr_t kStepPlan = 0, kNormPlan = 1;
  static constexpr size_t kHeaderWords = 5;
  static constexpr size_t kStepWord = kNumLists, kNumelWord = kNumLists + 1;
  static constexpr size_t kAbsmaxWord = kNumLists + 2;  // the first of kNumAbsmaxLists
  static constexpr size_t kQuantWord = kAbsmaxWord + kNumAbsmaxLists;
  static constexpr size_t kWordsPerTensor = kQuantWord + 1;
  std::vector<uintptr_t> words;
  size_t n_tensors() const { return (words.size() - kHeaderWords) / kWordsPerTensor; }
  size_t param_elem_size() const { return words[1]; }
  size_t state_elem_size() const { return words[3]; }
  bool quant() const { return words[4] != 0; }
  const uintptr_t* tensor_words(size_t i) const {
    return words.data() + kHeaderWords + i * kWordsPerTensor;
  }
  size_t hash() const;
};

// Checks everything the kernels rely on (one message per rule) and fills `key`; device_type is
// the backend that was dispatched to. Returns false when there is nothing to do (no params).
// In the same pass it bumps the version counters of the tensors the step mutates, as torch's
// in-place ops do: with no Tensor returned, no autograd fallback would do it for this op.
bool check_step_args(const StepArgs& a, c10::DeviceType device_type, PlanKey& key);

// The same for ademamix::grad_norm_partials: `grads` on one device of device_type, one dtype
// (fp32, bf16 or fp16), dense. Fills a norm plan's key; false when there are no grads.
bool check_norm_args(at::TensorList grads, c10::DeviceType device_type, PlanKey& key);

HyperParams make_hyper_params(const StepArgs& a);
ScalarPtrs make_scalar_ptrs(const StepArgs& a);

// The chunk decomposition both backends walk. Byte layout of a plan buffer:
// [TensorRecord x n_tensors][ChunkRecord x n_chunks][BlockCounter x n_tensors], counters zero.
struct Plan {
  std::vector<TensorRecord> tensors;
  std::vector<ChunkRecord> chunks;
  size_t chunks_offset() const { return tensors.size() * sizeof(TensorRecord); }
  size_t counters_offset() const {
    const size_t end = chunks_offset() + chunks.size() * sizeof(ChunkRecord);
    return (end + alignof(BlockCounter) - 1) / alignof(BlockCounter) * alignof(BlockCounter);
  }
  size_t bytes() const { return counters_offset() + tensors.size() * sizeof(BlockCounter); }
  void serialize(void* dst) const;  // writes bytes() bytes
};

// Builds the plan of `key`. Refuses a call in which a tensor the step writes (a param, a state,
// a step count) shares memory with another tensor of the call: its blocks would race.
Plan build_plan(const PlanKey& key);

// A plan laid out in one buffer (on the device of the tensors), as a kernel launch needs it.
struct PlanView {
  at::Tensor buffer;  // keeps the plan alive until the launch is enqueued
  int64_t n_chunks;
  size_t chunks_offset, counters_offset;
  LaunchPlan launch_plan() const {
    char* b = static_cast<char*>(buffer.data_ptr());
    return LaunchPlan{reinterpret_cast<const TensorRecord*>(b),
                      reinterpret_cast<const ChunkRecord*>(b + chunks_offset),
                      reinterpret_cast<BlockCounter*>(b + counters_offset)};
  }
};

// Plans by key, most recently used first. A training loop reuses the same tensors every step:
// one build per set of tensors. Entry is the backend's record: it has `words` and `hash` (the
// key), `keep` (never evicted, e.g. read by a CUDA graph) and view() -> PlanView.
template <class Entry>
class PlanCache {
 public:
  // The view of the plan of `key`: on a hit on_hit(entry) runs first; on a miss make(hash)
  // returns the new entry. Both run under the cache's lock.
  template <class Make, class OnHit>
  PlanView get(const PlanKey& key, Make&& make, OnHit&& on_hit) {
    const size_t hash = key.hash();
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->hash == hash && it->words == key.words) {
        entries_.splice(entries_.begin(), entries_, it);  // most recently used first
        on_hit(entries_.front());
        return entries_.front().view();
      }
    }
    entries_.push_front(make(hash));
    evict();
    return entries_.front().view();
  }

 private:
  // Plans held apart from the kept ones.
  static constexpr size_t kMaxEvictable = 16;

  void evict() {
    size_t evictable = 0;
    for (const Entry& e : entries_) {
      evictable += e.keep ? 0 : 1;
    }
    for (auto it = entries_.end(); evictable > kMaxEvictable && it != entries_.begin();) {
      --it;
      if (!it->keep) {
        it = entries_.erase(it);  // a device buffer's free is ordered after its queued work
        --evictable;
      }
    }
  }

  std::mutex mutex_;
  std::list<Entry> entries_;
};

// A launch of the plan `view` of `key` for the checked arguments `a`.
LaunchArgs launch_args(const StepArgs& a, const PlanKey& key, const PlanView& view);

// The plan of `key` for CPU tensors, from a cache shared by the CPU kernels.
PlanView cpu_plan(const PlanKey& key);

ParamDtype param_dtype(at::ScalarType t);

// A launch of the norm plan `view` of `grads` (dtype, plan and chunk count).
LaunchArgs norm_launch_args(at::TensorList grads, const PlanView& view);

// A fp32 tensor of one partial per chunk of the norm plan `view`, on `device`, to be filled.
at::Tensor new_partials(const PlanView& view, const at::Device& device);

// The CPU kernel that stands in for the GPU in tests: the CUDA kernel's block function on host
// threads, blocks in a new shuffled order each launch.
void run_gpu_blocks(const LaunchArgs& a);

// The op's kernel for both overloads of the schema (Lr = double, or const at::Tensor& for
// step_.tensor_lr), forwarding to Run (the CPU or the CUDA implementation).
template <void (*Run)(const StepArgs&), typename Lr>
void step_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_fasts,
             at::TensorList exp_avg_slows, at::TensorList exp_avg_sqs, at::TensorList state_steps,
             Lr lr, double beta1, double beta2, double beta3, double alpha,
             std::optional<int64_t> beta3_warmup, std::optional<int64_t> alpha_warmup, double eps,
             double weight_decay, bool maximize, const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf, std::optional<int64_t> sr_seed,
             bool param_sr, std::optional<at::TensorList> exp_avg_fast_absmaxs,
             std::optional<at::TensorList> exp_avg_slow_absmaxs,
             std::optional<at::TensorList> exp_avg_sq_absmaxs) {
  StepArgs args{{params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs},
                state_steps,
                0.0,
                nullptr,
                beta1,
                beta2,
                beta3,
                alpha,
                beta3_warmup,
                alpha_warmup,
                eps,
                weight_decay,
                maximize,
                grad_scale.has_value() ? &*grad_scale : nullptr,
                found_inf.has_value() ? &*found_inf : nullptr,
                sr_seed,
                param_sr,
                {exp_avg_fast_absmaxs.value_or(at::TensorList{}),
                 exp_avg_slow_absmaxs.value_or(at::TensorList{}),
                 exp_avg_sq_absmaxs.value_or(at::TensorList{})}};
  if constexpr (std::is_same_v<Lr, double>) {
    args.lr = lr;
  } else {
    args.lr_tensor = &lr;
  }
  Run(args);
}

}  // namespace ademamix
