"""Careful file I/O: read only regular files, within the size their format allows; write by rename; partials.

A path given as input can be anything: a FIFO or /dev/zero would be read until memory runs out, a 2 GB
"config.json" is a mistake, never a config. Readers here refuse both before reading, naming the file.
Writers write a sibling temporary file and rename it into place, so a reader never sees half a file and an
interrupted write leaves the old file as it was.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

from lorafast_export.errors import InputError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
# What a format implies: JSON configs and manifests are small; tokenizer files reach tens of MB (Gemma's 34 MB).
LIMITS = {
    "config": 16 * MiB,
    "index": 64 * MiB,
    "manifest": 64 * MiB,
    "report": 64 * MiB,
    "recipe": 1 * MiB,
    "tokenizer": 1 * GiB,
}


# Digests of large files this process already hashed, by (device, inode, size, mtime, ctime): a build hashes its
# inputs when it loads them and validation keys its reference cache by the same files (16 GB at 8B: ~10 s of
# SHA-256 each time). Any write changes ctime; small files (manifests, reports) are always hashed afresh.
_DIGESTS: dict[tuple[int, ...], str] = {}
_MEMO_MIN_BYTES = 64 * MiB


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    if st.st_size >= _MEMO_MIN_BYTES:
        _DIGESTS[key] = h.hexdigest()
    return h.hexdigest()


def require_regular(path: Path, what: str = "input") -> os.stat_result:
    """stat(path) if it is a regular file (after links); otherwise a clear error. Never opens the path."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found.") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read the {what} ({e.strerror}).") from None
    if not stat.S_ISREG(st.st_mode):
        kind = _kind(st.st_mode)
        raise InputError(
            f"{path}: the {what} is {kind}, not a regular file; only regular files are read. "
            "Pass a file (copy the data into one)."
        )
    return st


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_bytes(path: Path, what: str, limit: int) -> bytes:
    """The whole file, if it is a regular file of at most `limit` bytes."""
    st = require_regular(path, what)
    if st.st_size > limit:
        raise InputError(
            f"{path}: the {what} is {st.st_size:,} bytes; a {what} is at most {limit:,}. Is this the right file?"
        )
    with open(path, "rb") as f:
        data = f.read(limit + 1)  # the file may have grown since stat
    if len(data) > limit:
        raise InputError(f"{path}: the {what} grew past {limit:,} bytes while being read.")
    return data


def read_text(path: Path, what: str, limit: int) -> str:
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: the {what} is not UTF-8 text (byte {e.start}).") from None


def create_new(path: Path):
    """Open a fresh file for writing (binary) at a path of ours (a `.partial-PID` name): whatever is there is
    removed first, and the file is created, never opened through a link someone planted there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    return os.fdopen(fd, "wb")


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write path via a temporary sibling and rename: the old file stays whole until the new one is."""
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        with create_new(tmp) as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------- partials of dead processes

_PARTIAL = re.compile(r"\.(?:partial|old|bad)-(\d+)$")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def dead_partials(parent: Path, prefix: str) -> list[Path]:
    """Entries `<prefix>….partial-PID` / `.old-PID` / `.bad-PID` in parent whose process is gone (a killed run's)."""
    if not parent.is_dir():
        return []
    out = []
    for p in parent.iterdir():
        m = _PARTIAL.search(p.name)
        if (
            p.name.startswith(prefix)
            and m
            and int(m.group(1)) != os.getpid()
            and not pid_alive(int(m.group(1)))
        ):
            out.append(p)
    return sorted(out)


def current_umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def apply_umask(root: Path) -> None:
    """Give every file and directory under root the modes a plain `open`/`mkdir` would have (some writers,
    e.g. safetensors', create files 0600): files rw for whoever the umask allows, executables keep x."""
    mask = current_umask()
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                base = 0o777 if st.st_mode & 0o111 else 0o666
                os.chmod(p, base & ~mask)
