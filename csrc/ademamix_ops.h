// Host glue shared by the CPU implementation (ademamix_ops.cpp) and the CUDA implementation
// (ademamix_cuda.cpp) of ademamix::step_: the arguments, their checks, the hyperparameters as
// the kernels see them, and the plan (per-tensor and per-chunk records).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

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
};

// What a plan is made of, gathered while the arguments are checked (one pass over the
// tensors): the device, then per tensor its five data pointers (0 for an absent m1), its step
// pointer and numel. The CUDA plan cache compares keys in full.
struct PlanKey {
  static constexpr size_t kWordsPerTensor = kNumLists + 2;
  std::vector<uintptr_t> words;
  size_t n_tensors() const { return (words.size() - 1) / kWordsPerTensor; }
  size_t hash() const;
};

// Checks everything the kernels rely on (one message per rule) and fills `key`; device_type is
// the backend that was dispatched to. Returns false when there is nothing to do (no params).
// In the same pass it bumps the version counters of the tensors the step mutates, as torch's
// in-place ops do: with no Tensor returned, no autograd fallback would do it for this op.
bool check_step_args(const StepArgs& a, c10::DeviceType device_type, PlanKey& key);

HyperParams make_hyper_params(const StepArgs& a);
ScalarPtrs make_scalar_ptrs(const StepArgs& a);

// The chunk decomposition both backends walk. Byte layout of the device copy:
// [TensorRecord x n_tensors][ChunkRecord x n_chunks][uint32 counter x n_tensors], counters zero.
struct Plan {
  std::vector<TensorRecord> tensors;
  std::vector<ChunkRecord> chunks;
  size_t chunks_offset() const { return tensors.size() * sizeof(TensorRecord); }
  size_t counters_offset() const { return chunks_offset() + chunks.size() * sizeof(ChunkRecord); }
  size_t bytes() const { return counters_offset() + tensors.size() * sizeof(uint32_t); }
  void serialize(void* dst) const;  // writes bytes() bytes
};

Plan build_plan(const PlanKey& key);

// The op's kernel for both overloads of the schema (Lr = double, or const at::Tensor& for
// step_.tensor_lr), forwarding to Run (the CPU or the CUDA implementation).
template <void (*Run)(const StepArgs&), typename Lr>
void step_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_fasts,
             at::TensorList exp_avg_slows, at::TensorList exp_avg_sqs, at::TensorList state_steps,
             Lr lr, double beta1, double beta2, double beta3, double alpha,
             std::optional<int64_t> beta3_warmup, std::optional<int64_t> alpha_warmup, double eps,
             double weight_decay, bool maximize, const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf) {
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
                found_inf.has_value() ? &*found_inf : nullptr};
  if constexpr (std::is_same_v<Lr, double>) {
    args.lr = lr;
  } else {
    args.lr_tensor = &lr;
  }
  Run(args);
}

}  // namespace ademamix
