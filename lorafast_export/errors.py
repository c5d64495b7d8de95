"""Errors the user can act on. The CLI maps them to exit codes and prints them without a traceback."""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2


class LorafastError(Exception):
    """Base class: a message that names the file/tensor/field and says what to do."""

    exit_code = EXIT_BAD_INPUT


class InputError(LorafastError):
    """Bad input: a file, tensor, field or flag the user gave us is wrong."""


class UnsupportedError(LorafastError):
    """A valid input we do not (yet) support, e.g. an architecture or a PEFT type."""


class RuntimeMissingError(LorafastError):
    """A target's runtime is not installed here. The message carries the install command."""


class GateFailed(LorafastError):
    """One or more validation gates failed."""

    exit_code = EXIT_GATE_FAILED
