"""Writing report files (report.*, JUnit, summaries) into a directory without ever writing outside it."""

from __future__ import annotations

from pathlib import Path

from lorafast_export.errors import InputError
from lorafast_export.paths import outside_reason


def write_inside(root: Path, files: dict[str, str]) -> list[Path]:
    """Write each root/rel (UTF-8). Every path is checked before any is written: none may leave root (absolute,
    '..', or a symbolic link on the way or at the end: a link planted in a downloaded artifact would otherwise
    have us overwrite what it points to)."""
    for rel in files:
        path = root / rel
        why = outside_reason(root, rel) or ("is a symbolic link" if path.is_symlink() else None)
        if why:
            raise InputError(
                f"{path}: not written, because {rel!r} {why}. Write reports into a directory of "
                "your own (a fresh --out), not through links."
            )
    written = []
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
