// The fast CPU kernel built for AVX2 and FMA (setup.py compiles this module with -mavx2 -mfma
// -mf16c and ATen's CPU_CAPABILITY_AVX2). It registers nothing: ademamix_cuda.backends passes
// kernel_addresses() to torch.ops.ademamix._set_cpu_kernel when the CPU runs AVX2.
#include <Python.h>

#define ADEMAMIX_CPU_ISA cpu_avx2
#include "../ademamix_cpu_kernel.h"

namespace {

PyObject* kernel_addresses(PyObject*, PyObject*) {
  return Py_BuildValue("(NN)",
                       PyLong_FromVoidPtr(reinterpret_cast<void*>(&ademamix::cpu_avx2::run_cpu_launch)),
                       PyLong_FromVoidPtr(reinterpret_cast<void*>(&ademamix::cpu_avx2::run_cpu_norm)));
}

PyMethodDef methods[] = {
    {"kernel_addresses", kernel_addresses, METH_NOARGS,
     "The addresses of this build's step and norm kernels, for "
     "torch.ops.ademamix._set_cpu_kernel."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_avx2", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__cpu_avx2(void) { return PyModule_Create(&module); }
