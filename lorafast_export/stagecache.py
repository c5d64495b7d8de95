"""Content-addressed cache of finished stages (merged checkpoints, quantized forms).

A stage's key hashes everything its output depends on: the inputs' sha256, the recipe sections it reads and the
library versions. An entry is written into a `.partial-<pid>` directory and renamed into place only when
complete, so a killed build leaves no entry that looks finished; the next build recomputes it, and removes the
partials of processes that no longer run. Each entry records its files with their sha256 in RECORD (inside it,
so the record and the files land together in one rename), checked on every use: a damaged entry (a flipped byte, a missing or added file) is rebuilt with a warning, never used.
Two builds computing the same entry at once each write their own partial; the second to finish uses the first's.
Set LORAFAST_CACHE to move the cache (default ~/.cache/lorafast-export); deleting it is always safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lorafast_export.errors import InputError
from lorafast_export.manifest import file_entries, walk
from lorafast_export.safeio import LIMITS, dead_partials, read_text, write_atomic

log = logging.getLogger(__name__)


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
        for stale in dead_partials(final.parent, "."):
            shutil.rmtree(stale, ignore_errors=True)
        if final.is_dir():
            why = entry_problem(final)
            if why is None:
                yield final, True
                return
            log.warning("stage cache entry %s is damaged (%s); rebuilding it", final, why)
            _discard(final)
        partial = final.parent / f".{key}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            partial.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(
                f"{partial.parent}: cannot create the stage cache ({e.strerror}). Point LORAFAST_CACHE at a "
                "writable directory, or pass --no-cache."
            ) from None
        try:
            yield partial, False
            seal(partial)
            _land(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise


RECORD = ".entry.json"  # not part of the stage's output: a target copying an entry leaves it out


def seal(partial: Path) -> None:
    """Record every file of a finished entry with its sha256 (inside it, before it is renamed into place)."""
    files, links, other = walk(partial)
    if links or other:
        raise RuntimeError(f"{partial}: a stage wrote links or special files: {links + other}")
    write_atomic(partial / RECORD, json.dumps({"files": file_entries(partial, files)}) + "\n")


def entry_problem(entry: Path) -> str | None:
    """Why a cache entry cannot be used (None: every recorded file is there, unchanged, and nothing else)."""
    try:
        recorded = json.loads(read_text(entry / RECORD, "cache record", LIMITS["manifest"]))["files"]
        want = {f["path"]: (f["sha256"], f["bytes"]) for f in recorded}
    except (InputError, json.JSONDecodeError, KeyError, TypeError) as e:
        return f"no valid record of its files: {str(e)[:200]}"
    files, links, other = walk(entry)
    files = [f for f in files if f != RECORD]
    if links or other or set(files) != set(want):
        return f"files differ from its record: {sorted(set(files) ^ set(want)) + links + other}"
    for f in file_entries(entry, files):
        if (f["sha256"], f["bytes"]) != want[f["path"]]:
            return f"{f['path']} changed since it was written"
    return None


def _land(partial: Path, final: Path) -> None:
    try:
        partial.rename(final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(partial, ignore_errors=True)  # another build finished the same entry first: use theirs


def _discard(entry: Path) -> None:
    bad = entry.parent / f".{entry.name}.bad-{os.getpid()}"
    try:
        entry.rename(bad)
    except FileNotFoundError:  # another build discarded it already
        return
    shutil.rmtree(bad, ignore_errors=True)
