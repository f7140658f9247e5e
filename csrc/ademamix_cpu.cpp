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

std::atomic<CpuKernel> cpu_kernel{&cpu_baseline::run_cpu_launch};
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

// `address`: another build of run_cpu_launch (an instruction set the CPU has), from a module
// built from the same sources; 0 restores the baseline build.
void set_cpu_kernel(int64_t address) {
  cpu_kernel.store(address == 0 ? &cpu_baseline::run_cpu_launch
                                : reinterpret_cast<CpuKernel>(static_cast<uintptr_t>(address)));
}

// Test-only: `enable` selects the GPU stand-in for every later CPU call; returns the old mode.
bool set_cpu_gpu_blocks(bool enable) { return gpu_blocks_mode.exchange(enable); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(ademamix, m) {
  m.def("_set_cpu_kernel(int address) -> ()", &set_cpu_kernel);
  m.def("_cpu_gpu_blocks(bool enable) -> bool", &set_cpu_gpu_blocks);
}

TORCH_LIBRARY_IMPL(ademamix, CPU, m) {
  m.impl("step_", TORCH_FN((step_op<step_cpu, double>)));
  m.impl("step_.tensor_lr", TORCH_FN((step_op<step_cpu, const at::Tensor&>)));
}

}  // namespace ademamix
