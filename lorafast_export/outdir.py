"""The output directory: locked, staged beside it, published by rename, replaced only when it is ours.

    with staged_output(out, force) as stage:   # lock `.<name>.lock`, check `out`, clean dead partials
        ...write everything into stage...
        publish(stage, out)                     # rename into place (the old artifact replaced with --force)

A second build into the same `out` finds the lock taken and stops (exit 2) before touching anything, so it can
never delete the first one's staging directory. Partials (`.<name>.partial-PID`) and replaced artifacts
(`.<name>.old-PID`) of processes that no longer run are removed; an old artifact whose replacement never landed
(the build was killed between the two renames) is put back.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lorafast_export.errors import InputError, raise_if_terminated
from lorafast_export.manifest import replace_refusal
from lorafast_export.safeio import apply_umask, dead_partials

_STAGING = re.compile(r"^\.(.+)\.partial-\d+$")


def shown_path(path: Path | str) -> Path:
    """A path as the user will find it: a build's staging directory `.<name>.partial-PID` named as the output
    `<name>` it becomes, so that a warning or error raised while validating the staged artifact names the artifact
    and not a hidden directory that is gone when the build ends."""
    path = Path(path)
    return Path(*(m.group(1) if (m := _STAGING.match(part)) else part for part in path.parts))


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` (flock on `.<name>.lock` beside it); refuse if another process has it."""
    lock = out.parent / f".{out.name}.lock"
    while True:
        try:  # never through a link: a planted `.<name>.lock -> ~/file` would have us truncate that file
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            raise InputError(
                f"{lock}: cannot use it as the output's lock file ({e.strerror}); it should be a plain file "
                "or absent. Remove it if no build is running, or choose another --out."
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise InputError(
                f"{out}: another lorafast-export process (pid {holder}) is writing this output now. Wait for it "
                "to finish, or write somewhere else."
            ) from None
        try:  # the holder before us may have removed the file after we opened it: lock the one on disk
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def check_output(out: Path, force: bool) -> None:
    if (out.exists() or out.is_symlink()) and not force:
        raise InputError(f"{out}: already exists. Pass --force to replace it, or choose another --out.")
    if out.exists() or out.is_symlink():
        why = replace_refusal(out)
        if why:
            raise InputError(
                f"{out}: {why}. --force replaces only lorafast-export artifacts (a manifest.json of ours and "
                "the files it lists), never anything else; nothing was touched. Choose another --out, or "
                "remove it yourself."
            )


def clean_dead_partials(out: Path) -> None:
    """Remove what killed runs left beside `out`; put back an old artifact whose replacement never landed."""
    for p in dead_partials(out.parent, f".{out.name}."):
        if (
            ".old-" in p.name
            and p.is_dir()
            and not p.is_symlink()
            and not out.exists()
            and not out.is_symlink()
        ):
            p.rename(out)
        else:
            _remove(p)


def _make_parent(out: Path) -> None:
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{parent}: cannot create the output's parent directory ({e.strerror}).") from None
    if not os.access(parent, os.W_OK):
        raise InputError(f"{parent}: not writable; choose another --out.")


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield a fresh staging directory beside `out`, under the output's lock; removed if the body fails."""
    check_output(out, force)  # before creating anything: a refused output leaves no trace
    _make_parent(out)
    with output_lock(out):
        clean_dead_partials(out)
        check_output(out, force)  # again under the lock: the first check raced with other processes
        stage = out.parent / f".{out.name}.partial-{os.getpid()}"
        _remove(stage)
        stage.mkdir()
        try:
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)  # gone already when published


def _remove(path: Path) -> None:
    """Remove what is at path (a directory tree, or just the link or file: never what a link points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def publish(stage: Path, out: Path) -> None:
    """Rename the finished staging directory into place; an old artifact (with --force) is replaced."""
    raise_if_terminated()  # a SIGTERM whose exception was lost (raised inside a __del__) still stops the build
    apply_umask(stage)  # some writers create 0600 files; an artifact gets the modes the user's umask gives
    old = None
    if out.exists() or out.is_symlink():
        why = replace_refusal(out)  # re-checked: files may have appeared in it during the build
        if why:
            raise InputError(f"{out}: {why}; not replaced (the new artifact was discarded).")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    stage.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
