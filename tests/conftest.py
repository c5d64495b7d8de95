import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own stage/reference cache, so nothing leaks between tests or into ~/.cache."""
    monkeypatch.setenv("LORAFAST_CACHE", str(tmp_path_factory.mktemp("cache")))
