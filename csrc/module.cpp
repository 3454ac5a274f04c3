// Makes mars_kernels._C importable as a Python extension module. It defines
// no Python functions: importing it loads the shared library, whose static
// TORCH_LIBRARY_IMPL blocks register the CPU and CUDA kernels of the ops
// torch.ops.mars_kernels.*. The schemas are declared in Python, beside each op
// (mars_kernels/ops/<op>.py, through mars_kernels.library.register).
#include <Python.h>

static struct PyModuleDef mars_kernels_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mars_kernels_c_module); }
