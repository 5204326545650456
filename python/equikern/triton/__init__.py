"""Triton kernels, generated for the problem at hand (instruction list, degree) and cached.

Nothing here is imported by ``import equikern``: the modules import triton lazily, so the package works
without it. On a machine without a GPU the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1``, set by the tests), which is how CI checks them.
"""
