import importlib.util
import os

import pytest
import torch

# Triton's kernel tests run on a CPU through Triton's interpreter, whose flag must be set before anything imports
# triton: torch does when a test compiles (inductor), so a test module setting it would be too late. Set here, first.
if not torch.cuda.is_available() and importlib.util.find_spec("triton"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tiny models: one thread is faster than two (no OpenMP hand-off per op), and the suite stays fast on a busy box.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own stage/reference cache, so nothing leaks between tests or into ~/.cache."""
    monkeypatch.setenv("LORAFAST_CACHE", str(tmp_path_factory.mktemp("cache")))
