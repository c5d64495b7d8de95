"""Where the Triton kernel tests run: CUDA, else Triton's interpreter on the CPU (kernels run in numpy).

Import this before anything imports triton: the interpreter flag must be set when a kernel module is
imported (`triton.jit` reads it then) and when a kernel launches, so it stays set for the whole session.
triton is a dev dependency (pyproject), so CI runs these tests on its CPU through the interpreter."""

import importlib.util
import os
import sys

import pytest
import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and "triton" not in sys.modules and importlib.util.find_spec("triton"):
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported before the interpreter flag was set", allow_module_level=True)
