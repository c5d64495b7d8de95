import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine: two intra-op threads spin against each other (a 32x32
    F.linear took ms instead of us under load), one thread is fast and steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
