"""Errors the user can act on. The CLI maps them to exit codes and prints them without a traceback."""

from __future__ import annotations

import errno
import re
import shutil
import signal

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP, raised where the process is, so they unwind (staging, cache partials, the output lock)
    exactly as Ctrl-C does."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Signals received by this process (cli's handler records each one before raising). The raise can be lost: a
# signal handled while Python runs a __del__ or a weakref callback has its exception printed and dropped. So
# publishing checks this record too, and a build told to stop never publishes.
received_signals: list[int] = []


def raise_if_terminated() -> None:
    """Raise Terminated if SIGTERM / SIGHUP reached this process, even where its exception was swallowed."""
    if received_signals:
        raise Terminated(received_signals[0])


class LorafastError(Exception):
    """Base class: a message that names the file/tensor/field and says what to do."""

    exit_code = EXIT_BAD_INPUT


class InputError(LorafastError):
    """Bad input: a file, tensor, field or flag the user gave us is wrong."""


class UnsupportedError(LorafastError):
    """A valid input we do not (yet) support, e.g. an architecture or a PEFT type."""


class RuntimeMissingError(LorafastError):
    """A target's runtime is not installed here. The message carries the install command."""


class ArtifactLoadError(LorafastError):
    """A target's runtime is installed but refuses the artifact (e.g. a runtime version that cannot read it)."""


# What the system said when reading or writing failed for a reason of the machine's, not ours (errno -> why).
_IO_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file grew past the file system's or this process's file-size limit (ulimit -f)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted there",
    errno.EIO: "an I/O error (a failing disk or network file system)",
    errno.ENAMETOOLONG: "a file name is too long",
}


def io_error_as_input_error(e: BaseException) -> InputError | None:
    """A failed read or write (an OSError, or a safetensors error carrying one: '... (os error 28)') as a user error
    naming the file and what to do; None when `e` is not such a failure (then it is a bug)."""
    code, where = _os_error(e)
    if code not in _IO_REASONS:
        return None
    return InputError(
        f"{where}: {_IO_REASONS[code]} (errno {errno.errorcode.get(code, code)}). Nothing was published. Free some "
        "space or raise the limit, or choose another --out / LORAFAST_CACHE on a writable file system."
    )


def _os_error(e: BaseException) -> tuple[int | None, str]:
    # shutil.Error (copytree) is an OSError without an errno: the first failed file's message carries it
    if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
        _src, dst, why = e.args[0][0]  # copytree collects (src, dst, "[Errno N] ...") per file
        m = re.search(r"\[Errno (\d+)\]", str(why))
        return (int(m.group(1)) if m else None), str(dst)
    if isinstance(e, OSError):
        where = e.filename if e.filename is not None else "a file"
        return e.errno, str(where)
    if type(e).__name__ == "SafetensorError":  # safetensors' Rust writer reports the OS error in its message
        m = re.search(r"\(os error (\d+)\)", str(e))
        return (int(m.group(1)) if m else None), "a safetensors file being written"
    return None, ""
