"""The skip marker of the tests that run Triton kernels in the interpreter on CPU tensors.

Triton decides when a kernel is defined whether it runs in the interpreter; with a GPU and without
``TRITON_INTERPRET=1`` those tests cannot run (the GPU suite covers the kernels there)."""

import os

import pytest

INTERPRETER_ONLY = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                      reason="Triton interpreter tests on CPU tensors: set TRITON_INTERPRET=1 "
                                             "(the README's test command does)")
