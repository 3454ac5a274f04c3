// Makes mars_kernels._C importable as a Python extension module. It defines
// no Python functions: importing it loads the shared library, whose static
// TORCH_LIBRARY / TORCH_LIBRARY_IMPL blocks register the ops as
// torch.ops.mars_kernels.*.
#include <Python.h>

static struct PyModuleDef mars_kernels_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mars_kernels_c_module); }
