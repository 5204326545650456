// The equikern torch library and the (empty) Python module `equikern._C`.
//
// Importing equikern._C runs the static registrars of every translation unit linked into it:
// each op family declares its schemas with TORCH_LIBRARY_FRAGMENT(equikern, m) next to its CPU
// implementation (csrc/cpu/<family>.cpp), so adding a family never edits this file.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(equikern, m) {}

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "equikern compiled ops", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
