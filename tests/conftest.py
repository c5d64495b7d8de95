import pytest
import torch

# Tiny models: one thread is faster than two (no OpenMP hand-off per op), and the suite stays fast on a busy box.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own stage/reference cache, so nothing leaks between tests or into ~/.cache."""
    monkeypatch.setenv("LORAFAST_CACHE", str(tmp_path_factory.mktemp("cache")))
