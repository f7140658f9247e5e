// ademamix::step_: the op schema, the argument checks, the plan, and the CPU implementation
// (the same math and chunk walk as the CUDA kernel, so CI without a GPU runs the compiled code).
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

#include "ademamix.h"
#include "ademamix_ops.h"

namespace ademamix {

namespace {

constexpr const char* kOp = "ademamix::step_: ";
constexpr const char* kListNames[kNumLists] = {"params", "grads", "exp_avg_fasts", "exp_avg_slows",
                                               "exp_avg_sqs"};
constexpr const char* kAbsmaxNames[kNumAbsmaxLists] = {
    "exp_avg_fast_absmaxs", "exp_avg_slow_absmaxs", "exp_avg_sq_absmaxs"};

void check_on_device(const at::Tensor& t, const char* list, size_t i, const at::Device& device) {
  TORCH_CHECK(t.defined(), kOp, list, "[", i, "] is undefined");
  TORCH_CHECK(t.device() == device, kOp, "all tensors must be on the params' device ", device,
              ", but ", list, "[", i, "] is on ", t.device());
}

void check_scalar_tensor(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.defined(), kOp, name, " is undefined");
  TORCH_CHECK(t.device() == device, kOp, name, " must be on the params' device ", device,
              ", but is on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, kOp, name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.numel() == 1, kOp, name, " must have exactly one element, got ", t.numel());
}

// The kernels walk each tensor's memory linearly, so a state must map element i to the same
// memory offset as its param: both contiguous, or both dense with identical strides.
void check_layout(const at::Tensor& t, const char* list, size_t i, const at::Tensor& param,
                  bool param_contiguous) {
  TORCH_CHECK(t.layout() == at::kStrided, kOp, list, "[", i,
              "] must be a dense (strided) tensor, got ", t.layout());
  if (param_contiguous && t.is_contiguous()) {
    return;
  }
  if (&t == &param) {
    TORCH_CHECK(t.is_non_overlapping_and_dense(), kOp, list, "[", i,
                "] must be contiguous (or dense: no gaps, no overlaps); got shape ", t.sizes(),
                " with strides ", t.strides());
    return;
  }
  TORCH_CHECK(t.is_non_overlapping_and_dense() && t.strides() == param.strides(), kOp, list, "[",
              i, "] must have the memory layout of params[", i,
              "] (both contiguous, or dense with equal strides); got strides ", t.strides(),
              " for params[", i, "] strides ", param.strides());
}

}  // namespace

bool check_step_args(const StepArgs& a, c10::DeviceType device_type, PlanKey& key) {
  const at::TensorList params = a.lists[kParamIdx];
  const size_t n = params.size();
  for (int k : {kGradIdx, kExpAvgSlowIdx, kExpAvgSqIdx}) {
    TORCH_CHECK(a.lists[k].size() == n, kOp, kListNames[k], " must have one tensor per param (got ",
                a.lists[k].size(), " for ", n, " params)");
  }
  TORCH_CHECK(a.state_steps.size() == n, kOp, "state_steps must have one tensor per param (got ",
              a.state_steps.size(), " for ", n, " params)");
  const bool has_m1 = a.beta1 != 0.0;
  const size_t n_fast = a.lists[kExpAvgFastIdx].size();
  if (has_m1) {
    TORCH_CHECK(n_fast == n, kOp,
                "exp_avg_fasts must have one tensor per param when beta1 != 0 (got ", n_fast,
                " for ", n, " params)");
  } else {
    TORCH_CHECK(n_fast == 0, kOp, "exp_avg_fasts must be empty when beta1 == 0 (got ", n_fast,
                " tensors)");
  }
  if (n == 0) {
    return false;
  }

  TORCH_CHECK(params[0].defined(), kOp, "params[0] is undefined");
  const at::Device device = params[0].device();
  TORCH_CHECK(device.type() == device_type, kOp, "the ", device_type,
              " kernel was selected (an argument is on ", device_type, ") but params are on ",
              device, "; all tensors must be on the params' device");
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kOp,
              "params must be float32, bfloat16 or float16, got ", dtype);
  if (a.lr_tensor != nullptr) {
    check_scalar_tensor(*a.lr_tensor, "lr", device);
  }
  if (a.grad_scale != nullptr) {
    check_scalar_tensor(*a.grad_scale, "grad_scale", device);
  }
  if (a.found_inf != nullptr) {
    check_scalar_tensor(*a.found_inf, "found_inf", device);
  }
  TORCH_CHECK(!a.param_sr || dtype == at::kBFloat16, kOp,
              "param_sr (stochastic rounding of the params) needs bfloat16 params, got ", dtype);
  // 8-bit states (uint8 codes) or one unquantized state dtype per call, that of the first
  // exp_avg_slow that is not uint8 (float32 when all are).
  const at::TensorList slows = a.lists[kExpAvgSlowIdx];
  at::ScalarType state_dtype = at::kFloat;
  bool any_quant = false;
  bool found_unquantized = false;
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(slows[i].defined(), kOp, "exp_avg_slows[", i, "] is undefined");
    const at::ScalarType t = slows[i].scalar_type();
    if (t == at::kByte) {
      any_quant = true;
    } else if (!found_unquantized) {
      state_dtype = t;
      found_unquantized = true;
    }
  }
  TORCH_CHECK(state_dtype == at::kFloat || state_dtype == at::kBFloat16, kOp,
              "states must be float32, bfloat16 or uint8 (8-bit codes), got ", state_dtype,
              " for exp_avg_slows");
  for (int j = 0; j < kNumAbsmaxLists; ++j) {
    const size_t got = a.absmax[j].size();
    const size_t want = (j == 0 && !has_m1) ? 0 : n;
    TORCH_CHECK(got == want || (got == 0 && !any_quant), kOp, kAbsmaxNames[j], " must have ",
                want == 0 ? "no tensors (beta1 == 0)" : "one tensor per param", any_quant ?
                " (8-bit states need their absmax)" : " or none", ", got ", got);
  }
  TORCH_CHECK(a.sr_seed.has_value() || (state_dtype == at::kFloat && !a.param_sr && !any_quant),
              kOp, "sr_seed is required with bfloat16 or 8-bit states or param_sr (it keys the "
              "random bits of the stochastic rounding)");
  TORCH_CHECK(!a.sr_seed.has_value() || *a.sr_seed >= 0, kOp, "sr_seed must be >= 0, got ",
              *a.sr_seed);

  key.words.clear();
  key.words.reserve(PlanKey::kHeaderWords + n * PlanKey::kWordsPerTensor);
  key.words.push_back(static_cast<uintptr_t>(device.index()));
  key.words.push_back(static_cast<uintptr_t>(params[0].element_size()));
  key.words.push_back(PlanKey::kStepPlan);
  key.words.push_back(static_cast<uintptr_t>(at::elementSize(state_dtype)));
  key.words.push_back(any_quant ? 1 : 0);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_on_device(p, "params", i, device);
    TORCH_CHECK(p.scalar_type() == dtype, kOp, "all params of one call must share a dtype: params[",
                i, "] is ", p.scalar_type(), " but params[0] is ", dtype, " (call once per dtype)");
    const bool p_contiguous = p.is_contiguous();
    check_layout(p, "params", i, p, p_contiguous);
    p.unsafeGetTensorImpl()->bump_version();
    key.words.push_back(reinterpret_cast<uintptr_t>(p.mutable_data_ptr()));
    const bool quantized = slows[i].scalar_type() == at::kByte;
    TORCH_CHECK(!quantized || p_contiguous, kOp, "params[", i, "] must be contiguous: the blocks ",
                "of its 8-bit states are runs of ", kQBlock, " elements in row-major order");
    for (int k = kGradIdx; k < kNumLists; ++k) {
      if (k == kExpAvgFastIdx && !has_m1) {
        key.words.push_back(0);
        continue;
      }
      const at::Tensor& t = a.lists[k][i];
      check_on_device(t, kListNames[k], i, device);
      const at::ScalarType want = k == kGradIdx ? dtype : quantized ? at::kByte : state_dtype;
      TORCH_CHECK(t.scalar_type() == want, kOp, kListNames[k], "[", i, "] must be ", want,
                  k == kGradIdx ? " (the dtype of its param)"
                  : quantized   ? " (exp_avg_slows[i] is uint8: all its states are 8-bit codes)"
                                : " (one unquantized state dtype per call: that of the first "
                                  "exp_avg_slow that is not uint8)",
                  ", got ", t.scalar_type());
      TORCH_CHECK(t.sizes() == p.sizes(), kOp, kListNames[k], "[", i, "] has shape ", t.sizes(),
                  " but params[", i, "] has shape ", p.sizes());
      check_layout(t, kListNames[k], i, p, p_contiguous);
      // Grads are only read: a const pointer leaves a copy-on-write grad shared.
      const void* ptr = k == kGradIdx ? t.const_data_ptr() : t.mutable_data_ptr();
      if (k != kGradIdx) {
        t.unsafeGetTensorImpl()->bump_version();
      }
      key.words.push_back(reinterpret_cast<uintptr_t>(ptr));
    }
    const at::Tensor& step = a.state_steps[i];
    check_on_device(step, "state_steps", i, device);
    TORCH_CHECK(step.scalar_type() == at::kFloat && step.numel() == 1, kOp, "state_steps[", i,
                "] must be a 1-element float32 tensor, got ", step.scalar_type(), " with ",
                step.numel(), " elements");
    step.unsafeGetTensorImpl()->bump_version();
    key.words.push_back(reinterpret_cast<uintptr_t>(step.mutable_data_ptr()));
    key.words.push_back(static_cast<uintptr_t>(p.numel()));
    for (int j = 0; j < kNumAbsmaxLists; ++j) {
      if (a.absmax[j].empty()) {
        key.words.push_back(0);
        continue;
      }
      const at::Tensor& t = a.absmax[j][i];
      TORCH_CHECK(t.defined(), kOp, kAbsmaxNames[j], "[", i, "] is undefined");
      if (!quantized) {
        TORCH_CHECK(t.numel() == 0, kOp, kAbsmaxNames[j], "[", i, "] must be empty: params[", i,
                    "] has unquantized states (", state_dtype, "), got ", t.numel(), " elements");
        key.words.push_back(0);
        continue;
      }
      check_on_device(t, kAbsmaxNames[j], i, device);
      const int64_t blocks = num_qblocks(p.numel());
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.numel() == blocks &&
                      t.is_contiguous(),
                  kOp, kAbsmaxNames[j], "[", i, "] must be a contiguous float32 tensor of shape [",
                  blocks, "] (one absmax per ", kQBlock, " elements of params[", i, "], ",
                  p.numel(), " elements), got ", t.scalar_type(), " of shape ", t.sizes());
      t.unsafeGetTensorImpl()->bump_version();
      key.words.push_back(reinterpret_cast<uintptr_t>(t.mutable_data_ptr()));
    }
    key.words.push_back(quantized ? 1 : 0);
  }
  return true;
}

bool check_norm_args(at::TensorList grads, c10::DeviceType device_type, PlanKey& key) {
  constexpr const char* kNormOp = "ademamix::grad_norm_partials: ";
  if (grads.empty()) {
    return false;
  }
  TORCH_CHECK(grads[0].defined(), kNormOp, "grads[0] is undefined");
  const at::Device device = grads[0].device();
  TORCH_CHECK(device.type() == device_type, kNormOp, "the ", device_type,
              " kernel was selected but grads are on ", device);
  const at::ScalarType dtype = grads[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kNormOp,
              "grads must be float32, bfloat16 or float16, got ", dtype);
  key.words.clear();
  key.words.reserve(PlanKey::kHeaderWords + grads.size() * PlanKey::kWordsPerTensor);
  key.words.push_back(static_cast<uintptr_t>(device.index()));
  key.words.push_back(static_cast<uintptr_t>(grads[0].element_size()));
  key.words.push_back(PlanKey::kNormPlan);
  key.words.push_back(sizeof(float));
  key.words.push_back(0);
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    check_on_device(g, "grads", i, device);
    TORCH_CHECK(g.scalar_type() == dtype, kNormOp, "all grads of one call must share a dtype: "
                "grads[", i, "] is ", g.scalar_type(), " but grads[0] is ", dtype);
    check_layout(g, "grads", i, g, g.is_contiguous());
    key.words.push_back(0);
    key.words.push_back(reinterpret_cast<uintptr_t>(g.const_data_ptr()));
    for (int k = kExpAvgFastIdx; k < kNumLists; ++k) {
      key.words.push_back(0);
    }
    key.words.push_back(0);  // no step count
    key.words.push_back(static_cast<uintptr_t>(g.numel()));
    for (size_t w = PlanKey::kAbsmaxWord; w < PlanKey::kWordsPerTensor; ++w) {
      key.words.push_back(0);  // no 8-bit states
    }
  }
  return true;
}

HyperParams make_hyper_params(const StepArgs& a) {
  // Differences and logarithms in double, each rounded once to float (see HyperParams).
  const auto f = [](double b) { return std::log(0.5) / std::log(b + 1e-8) - 1.0; };
  HyperParams h;
  h.lr = static_cast<float>(a.lr);
  h.beta1 = static_cast<float>(a.beta1);
  h.one_minus_beta1 = static_cast<float>(1.0 - a.beta1);
  h.beta2 = static_cast<float>(a.beta2);
  h.one_minus_beta2 = static_cast<float>(1.0 - a.beta2);
  h.beta3 = static_cast<float>(a.beta3);
  h.one_minus_beta3 = static_cast<float>(1.0 - a.beta3);
  h.ln_beta1 = a.beta1 != 0.0 ? static_cast<float>(std::log(a.beta1)) : 0.0f;  // unused if 0
  h.ln_beta2 = static_cast<float>(std::log(a.beta2));
  h.f_beta1 = static_cast<float>(f(a.beta1));
  h.f_beta3 = static_cast<float>(f(a.beta3));
  h.ln_half = static_cast<float>(std::log(0.5));
  h.alpha = static_cast<float>(a.alpha);
  h.eps = static_cast<float>(a.eps);
  h.weight_decay = static_cast<float>(a.weight_decay);
  h.has_alpha_warmup = a.alpha_warmup.has_value();
  h.alpha_warmup = h.has_alpha_warmup ? static_cast<float>(*a.alpha_warmup) : 0.0f;
  h.has_beta3_warmup = a.beta3_warmup.has_value();
  h.beta3_warmup = h.has_beta3_warmup ? static_cast<float>(*a.beta3_warmup) : 0.0f;
  h.maximize = a.maximize;
  const uint64_t seed = static_cast<uint64_t>(a.sr_seed.value_or(0));
  h.seed_lo = static_cast<uint32_t>(seed);
  h.seed_hi = static_cast<uint32_t>(seed >> 32);
  return h;
}

ScalarPtrs make_scalar_ptrs(const StepArgs& a) {
  const auto ptr = [](const at::Tensor* t) -> const float* {
    return t != nullptr ? t->data_ptr<float>() : nullptr;
  };
  return ScalarPtrs{ptr(a.lr_tensor), ptr(a.grad_scale), ptr(a.found_inf)};
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
      TORCH_CHECK(false, kOp, "unsupported param dtype ", t);
  }
}

LaunchArgs launch_args(const StepArgs& a, const PlanKey& key, const PlanView& view) {
  LaunchArgs la;
  la.dtype = a.param_sr ? ParamDtype::kBFloat16Sr
                        : param_dtype(a.lists[kParamIdx][0].scalar_type());
  la.state_dtype = key.state_elem_size() == 2 ? StateDtype::kBFloat16 : StateDtype::kFloat32;
  la.quant = key.quant();
  la.has_m1 = !a.lists[kExpAvgFastIdx].empty();
  la.plan = view.launch_plan();
  la.n_chunks = view.n_chunks;
  la.n_tensors = static_cast<int64_t>(key.n_tensors());
  la.hyper = make_hyper_params(a);
  la.scalars = make_scalar_ptrs(a);
  return la;
}

size_t PlanKey::hash() const {
  size_t h = 0xcbf29ce484222325ull;  // FNV-1a over words
  for (uintptr_t w : words) {
    h = (h ^ w) * 0x100000001b3ull;
  }
  return h;
}

namespace {

constexpr const char* kStepsName = "state_steps";

// A tensor's memory in a call: [begin, end) bytes of list `list` (k*Idx, kNumLists for the
// step counts, kNumLists + 1 + j for absmax list j), entry `index`.
struct Region {
  uintptr_t begin, end;
  int list;
  size_t index;
  bool written() const { return list != kGradIdx; }
  const char* name() const {
    return list < kNumLists ? kListNames[list] : list == kNumLists ? kStepsName
                                                                  : kAbsmaxNames[list - kNumLists - 1];
  }
};

// Two blocks writing one address race (duplicate step tensors would be counted anywhere from
// once to n times). Grads are only read, so grads may share memory with each other.
void check_disjoint(const PlanKey& key) {
  const size_t n = key.n_tensors();
  const size_t elem = key.param_elem_size();
  const size_t state_elem = key.state_elem_size();
  std::vector<Region> regions;
  regions.reserve(n * PlanKey::kWordsPerTensor);
  for (size_t i = 0; i < n; ++i) {
    const uintptr_t* w = key.tensor_words(i);
    const size_t numel = w[PlanKey::kNumelWord];
    const size_t quant_elem = w[PlanKey::kQuantWord] != 0 ? 1 : state_elem;
    for (int k = 0; k < kNumLists && numel > 0; ++k) {
      if (w[k] != 0) {
        const size_t bytes = numel * (k == kParamIdx || k == kGradIdx ? elem : quant_elem);
        regions.push_back(Region{w[k], w[k] + bytes, k, i});
      }
    }
    for (int j = 0; j < kNumAbsmaxLists && numel > 0; ++j) {
      const uintptr_t at = w[PlanKey::kAbsmaxWord + j];
      if (at != 0) {
        const size_t bytes = static_cast<size_t>(num_qblocks(static_cast<int64_t>(numel))) * 4;
        regions.push_back(Region{at, at + bytes, kNumLists + 1 + j, i});
      }
    }
    const uintptr_t step = w[PlanKey::kStepWord];
    if (step != 0) {  // a norm plan has no step counts
      regions.push_back(Region{step, step + sizeof(float), kNumLists, i});
    }
  }
  std::sort(regions.begin(), regions.end(),
            [](const Region& a, const Region& b) { return a.begin < b.begin; });
  // Sweep: `reach` is the region that ends last among those seen. A region that starts before
  // that end overlaps it; one of any overlapping pair that involves a written region is found.
  const Region* reach = nullptr;
  for (const Region& r : regions) {
    if (reach != nullptr && r.begin < reach->end && (r.written() || reach->written())) {
      TORCH_CHECK(false, kOp, reach->name(), "[", reach->index, "] and ", r.name(), "[", r.index,
                  "] share memory; each param, state and step count of a call needs memory of its "
                  "own (is a tensor listed twice?)");
    }
    if (reach == nullptr || r.end > reach->end) {
      reach = &r;
    }
  }
}

}  // namespace

Plan build_plan(const PlanKey& key) {
  const size_t n = key.n_tensors();
  TORCH_CHECK(n <= static_cast<size_t>(std::numeric_limits<int32_t>::max()), kOp,
              "too many tensors");
  check_disjoint(key);
  // The vector path reads kVecElems elements per access of every list.
  const uintptr_t param_align = kVecElems * key.param_elem_size();
  const uintptr_t state_align = kVecElems * key.state_elem_size();
  const uintptr_t code_align = kQLaneElems;  // a lane's 8 codes in one access
  Plan plan;
  plan.tensors.resize(n);
  int64_t total_chunks = 0;
  for (size_t i = 0; i < n; ++i) {
    const uintptr_t* w = key.tensor_words(i);
    TensorRecord& r = plan.tensors[i];
    r = TensorRecord{};
    bool aligned = true;
    const bool quantized = w[PlanKey::kQuantWord] != 0;
    for (int k = 0; k < kNumLists; ++k) {
      r.ptr[k] = reinterpret_cast<void*>(w[k]);
      const uintptr_t align = k == kParamIdx || k == kGradIdx ? param_align
                              : quantized                     ? code_align
                                                              : state_align;
      aligned = aligned && w[k] % align == 0;
    }
    r.step = reinterpret_cast<float*>(w[PlanKey::kStepWord]);
    r.numel = static_cast<int64_t>(w[PlanKey::kNumelWord]);
    for (int j = 0; j < kNumAbsmaxLists; ++j) {
      r.absmax[j] = reinterpret_cast<float*>(w[PlanKey::kAbsmaxWord + j]);
    }
    r.vector_ok = aligned ? 1 : 0;
    r.quantized = quantized ? 1 : 0;
    total_chunks += num_chunks(r.numel);
  }
  // One block per chunk: the grid's x dimension caps the count.
  TORCH_CHECK(total_chunks <= std::numeric_limits<int32_t>::max(), kOp, "too many elements (",
              total_chunks, " chunks of ", kChunkSize, ")");
  plan.chunks.resize(static_cast<size_t>(total_chunks));
  size_t next = 0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t chunks = num_chunks(plan.tensors[i].numel);
    for (int64_t c = 0; c < chunks; ++c) {
      plan.chunks[next++] = ChunkRecord{static_cast<int32_t>(i), static_cast<int32_t>(c)};
    }
  }
  return plan;
}

void Plan::serialize(void* dst) const {
  char* out = static_cast<char*>(dst);
  std::memcpy(out, tensors.data(), tensors.size() * sizeof(TensorRecord));
  std::memcpy(out + chunks_offset(), chunks.data(), chunks.size() * sizeof(ChunkRecord));
  std::memset(out + chunks_offset() + chunks.size() * sizeof(ChunkRecord), 0,
              bytes() - chunks_offset() - chunks.size() * sizeof(ChunkRecord));
}

namespace {

// The GPU stand-in: the CUDA kernel's block function (step_block) on host threads, one block
// at a time per thread, its kBlockSize threads in turn. __syncthreads is a no-op there (the
// threads before it have all run), thread 0 runs last, and the block counter is a host atomic.
class HostBlock : public SerialLanes {  // quant_blocks: the lanes in turn
 public:
  template <class F>
  void for_each_thread(int n_busy, F&& f) {
    const int n = n_busy < kBlockSize ? n_busy : kBlockSize;  // later threads have no work
    for (int tid = 0; tid < n; ++tid) {
      f(tid);
    }
  }
  void sync() {}
  bool leader() const { return true; }
  template <class F>
  const StepScalars& scalars(F&& compute) {
    if (!have_scalars_) {
      scalars_ = compute();
      have_scalars_ = true;
    }
    return scalars_;
  }
 private:
  StepScalars scalars_;
  bool have_scalars_ = false;
};

struct CpuPlan {
  std::vector<uintptr_t> words;
  size_t hash;
  bool keep;
  PlanView plan;
  PlanView view() const { return plan; }
};

CpuPlan make_cpu_plan(const PlanKey& key, size_t hash) {
  const Plan plan = build_plan(key);
  at::Tensor buffer =
      at::empty({static_cast<int64_t>(plan.bytes())}, at::TensorOptions().dtype(at::kByte));
  plan.serialize(buffer.data_ptr());
  return CpuPlan{key.words, hash, false,
                 PlanView{buffer, static_cast<int64_t>(plan.chunks.size()), plan.chunks_offset(),
                          plan.counters_offset()}};
}

// The blocks of a launch in a shuffled order (a new one each launch), as a GPU may schedule
// them: a step count written too early, or a counter that is not a multiple at launch end,
// changes the numbers here, not only on a GPU.
std::vector<int64_t> shuffled_blocks(int64_t n) {
  static std::atomic<uint64_t> launches{0};
  uint64_t state = 0x9e3779b97f4a7c15ull * (launches.fetch_add(1) + 1);
  const auto next = [&state] {  // splitmix64
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  };
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    order[i] = i;
  }
  for (int64_t i = n - 1; i > 0; --i) {
    std::swap(order[i], order[next() % static_cast<uint64_t>(i + 1)]);
  }
  return order;
}

}  // namespace

LaunchArgs norm_launch_args(at::TensorList grads, const PlanView& view) {
  LaunchArgs la{};
  la.dtype = param_dtype(grads[0].scalar_type());
  la.plan = view.launch_plan();
  la.n_chunks = view.n_chunks;
  return la;
}

at::Tensor new_partials(const PlanView& view, const at::Device& device) {
  return at::empty({view.n_chunks}, at::TensorOptions().dtype(at::kFloat).device(device));
}

PlanView cpu_plan(const PlanKey& key) {
  static auto* cache = new PlanCache<CpuPlan>();  // leaked, like the CUDA one
  return cache->get(
      key, [&](size_t hash) { return make_cpu_plan(key, hash); }, [](CpuPlan&) {});
}

void run_gpu_blocks(const LaunchArgs& a) {
  const std::vector<int64_t> order = shuffled_blocks(a.n_chunks);
  dispatch_launch<float, c10::BFloat16, c10::Half>(a, [&](auto variant) {
    using V = decltype(variant);
    at::parallel_for(0, a.n_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        HostBlock block;
        step_block<V>(a.plan, order[i], a.hyper, a.scalars, block);
      }
    });
  });
}

namespace {

// With only empty lists the dispatcher has no tensor to pick a backend from and comes here;
// so do tensors on a device without a kernel.
void step_no_backend(const StepArgs& a) {
  const at::TensorList params = a.lists[kParamIdx];
  const bool known = !params.empty() && params[0].defined();
  const c10::DeviceType type = known ? params[0].device().type() : c10::DeviceType::CPU;
  PlanKey key;
  TORCH_CHECK(!check_step_args(a, type, key), kOp, "no kernel for params on ", params[0].device(),
              " (CPU and CUDA have one)");
}

// An empty list (no tensor to dispatch on: no partials), or grads on a device without a kernel.
at::Tensor norm_partials_no_backend(at::TensorList grads, bool /*inf_norm*/) {
  const c10::DeviceType type = grads.empty() || !grads[0].defined() ? c10::DeviceType::CPU
                                                                      : grads[0].device().type();
  PlanKey key;
  TORCH_CHECK(!check_norm_args(grads, type, key), "ademamix::grad_norm_partials: no kernel for "
              "grads on ", grads[0].device(), " (CPU and CUDA have one)");
  return at::empty({0}, at::TensorOptions().dtype(at::kFloat));
}

}  // namespace

// States (m1, m2, nu) are float32 or bfloat16 (one dtype per call), or per tensor 8-bit codes
// (uint8) with one float32 absmax per 256 elements in the absmax lists (each empty, or one
// tensor per param: empty tensors for the params with unquantized states). bf16 states are
// written with stochastic rounding, and so are bf16 params with param_sr. The random bits are keyed by sr_seed (required
// then), the tensor's index in the lists, the step and the element index (csrc/ademamix.h).
TORCH_LIBRARY(ademamix, m) {
  m.def(
      "step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg_fasts, "
      "Tensor(c!)[] exp_avg_slows, Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] state_steps, *, "
      "float lr, float beta1, float beta2, float beta3, float alpha, int? beta3_warmup, "
      "int? alpha_warmup, float eps, float weight_decay, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, int? sr_seed=None, "
      "bool param_sr=False, Tensor(f!)[]? exp_avg_fast_absmaxs=None, "
      "Tensor(g!)[]? exp_avg_slow_absmaxs=None, Tensor(h!)[]? exp_avg_sq_absmaxs=None) -> ()");
  m.def(
      "step_.tensor_lr(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg_fasts, "
      "Tensor(c!)[] exp_avg_slows, Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] state_steps, *, "
      "Tensor lr, float beta1, float beta2, float beta3, float alpha, int? beta3_warmup, "
      "int? alpha_warmup, float eps, float weight_decay, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, int? sr_seed=None, "
      "bool param_sr=False, Tensor(f!)[]? exp_avg_fast_absmaxs=None, "
      "Tensor(g!)[]? exp_avg_slow_absmaxs=None, Tensor(h!)[]? exp_avg_sq_absmaxs=None) -> ()");
  // One fp32 partial per chunk of the grads: sums of squares (the 2-norm) or largest magnitudes
  // (inf_norm). The grads are only read.
  m.def("grad_norm_partials(Tensor[] grads, bool inf_norm) -> Tensor");
}

// No derivative. Unlike torch's default fallback for custom ops, this one refuses an in-place
// update of a leaf that requires grad while grad mode is on, as torch's in-place ops do.
TORCH_LIBRARY_IMPL(ademamix, Autograd, m) {
  m.impl("step_", torch::autograd::autogradNotImplementedFallback());
  m.impl("step_.tensor_lr", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(ademamix, CompositeExplicitAutograd, m) {
  m.impl("step_", TORCH_FN((step_op<step_no_backend, double>)));
  m.impl("step_.tensor_lr", TORCH_FN((step_op<step_no_backend, const at::Tensor&>)));
  m.impl("grad_norm_partials", TORCH_FN(norm_partials_no_backend));
}

}  // namespace ademamix

// `import ademamix_cuda._C` loads this library (and so runs the registrations above); the module
// itself is empty: everything is reached through torch.ops.ademamix.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
