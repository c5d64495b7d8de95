"""Content-addressed cache of finished stages (merged checkpoints, quantized forms).

A stage's key hashes everything its output depends on: the inputs' sha256, the recipe sections it reads and the
library versions. An entry is written into a `.partial-<pid>` directory and renamed into place only when
complete, so a killed build leaves no entry that looks finished; the next build recomputes it. Set
LORAFAST_CACHE to move the cache (default ~/.cache/lorafast-export); deleting it is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("LORAFAST_CACHE", Path.home() / ".cache" / "lorafast-export"))


def content_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class StageCache:
    def __init__(self, enabled: bool, scratch: Path):
        self.enabled = enabled
        self.scratch = scratch  # where stages go when the cache is off (inside the build's staging dir)

    def path(self, stage: str, key: str) -> Path:
        """Where a finished entry lives (in the scratch directory when the cache is off)."""
        return cache_root() / "stages" / stage / key if self.enabled else self.scratch / stage

    @contextmanager
    def entry(self, stage: str, key: str) -> Iterator[tuple[Path, bool]]:
        """Yield (directory, hit). On a miss the body fills the directory; it is published when the body ends."""
        if not self.enabled:
            path = self.scratch / stage
            yield path, False
            return
        final = self.path(stage, key)
        if final.is_dir():
            yield final, True
            return
        partial = final.parent / f".{key}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield partial, False
            partial.rename(final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
