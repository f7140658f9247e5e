// The op's CPU implementation: the fast CPU kernel (ademamix_cpu_kernel.h), built here for the
// baseline instruction set; backends.py hands in the AVX2 build (module _cpu_avx2) when the CPU
// runs it. A test-only mode runs the GPU stand-in instead (run_gpu_blocks: the CUDA kernel's
// block function, blocks shuffled), so that CI exercises the GPU code's chunk walk and step
// handoff.
#define ADEMAMIX_CPU_ISA cpu_baseline
#include "ademamix_cpu_kernel.h"

#include <torch/library.h>

#include <atomic>

#include "ademamix_ops.h"

namespace ademamix {
namespace {

using CpuKernel = void (*)(const LaunchArgs&);
using CpuNormKernel = void (*)(const LaunchArgs&, bool, float*);

std::atomic<CpuKernel> cpu_kernel{&cpu_baseline::run_cpu_launch};
std::atomic<CpuNormKernel> cpu_norm_kernel{&cpu_baseline::run_cpu_norm};
std::atomic<bool> gpu_blocks_mode{false};

void step_cpu(const StepArgs& a) {
  PlanKey key;
  if (!check_step_args(a, c10::DeviceType::CPU, key)) {
    return;
  }
  const PlanView view = cpu_plan(key);
  const LaunchArgs launch = launch_args(a, key, view);
  if (gpu_blocks_mode.load(std::memory_order_relaxed)) {
    run_gpu_blocks(launch);
  } else {
    cpu_kernel.load(std::memory_order_relaxed)(launch);
  }
}

at::Tensor norm_partials_cpu(at::TensorList grads, bool inf_norm) {
  PlanKey key;
  TORCH_CHECK(check_norm_args(grads, c10::DeviceType::CPU, key),
              "ademamix::grad_norm_partials: no grads");
  const PlanView view = cpu_plan(key);
  at::Tensor partials = new_partials(view, grads[0].device());
  cpu_norm_kernel.load(std::memory_order_relaxed)(norm_launch_args(grads, view), inf_norm,
                                                  partials.data_ptr<float>());
  return partials;
}

// `step` and `norm`: another build of run_cpu_launch and run_cpu_norm (an instruction set the
// CPU has), from a module built from the same sources; 0 restores the baseline build.
void set_cpu_kernel(int64_t step, int64_t norm) {
  const auto at = [](int64_t address) { return reinterpret_cast<void*>(address); };
  cpu_kernel.store(step == 0 ? &cpu_baseline::run_cpu_launch
                             : reinterpret_cast<CpuKernel>(at(step)));
  cpu_norm_kernel.store(norm == 0 ? &cpu_baseline::run_cpu_norm
                                  : reinterpret_cast<CpuNormKernel>(at(norm)));
}

// Test-only: `enable` selects the GPU stand-in for every later CPU call; returns the old mode.
bool set_cpu_gpu_blocks(bool enable) { return gpu_blocks_mode.exchange(enable); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(ademamix, m) {
  m.def("_set_cpu_kernel(int step, int norm) -> ()", &set_cpu_kernel);
  m.def("_cpu_gpu_blocks(bool enable) -> bool", &set_cpu_gpu_blocks);
}

TORCH_LIBRARY_IMPL(ademamix, CPU, m) {
  m.impl("step_", TORCH_FN((step_op<step_cpu, double>)));
  m.impl("step_.tensor_lr", TORCH_FN((step_op<step_cpu, const at::Tensor&>)));
  m.impl("grad_norm_partials", TORCH_FN(norm_partials_cpu));
}

}  // namespace ademamix
