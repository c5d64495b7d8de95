"""Where the bundled data lives, and the one rule for paths written into an artifact."""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).parent / "data" / "demo"
TEXT_DIR = Path(__file__).parent / "data" / "text"


def resolve_path(p: str) -> Path:
    """`demo:NAME` → bundled demo asset; anything else → a filesystem path."""
    if p.startswith("demo:"):
        return DEMO_DIR / p.removeprefix("demo:")
    return Path(p).expanduser()


def outside_reason(root: Path, rel: str) -> str | None:
    """Why root/rel is not a file strictly inside root (absolute, '..', a symbolic link out), or None if it is."""
    p = Path(rel)
    if p.is_absolute() or rel.startswith("~"):
        return "is absolute; use a path relative to the directory"
    if ".." in p.parts:
        return "climbs out with '..'"
    if not p.parts:
        return "names the directory itself, not a file in it"
    if not (root / p).resolve().is_relative_to(root.resolve()):
        return "leaves the directory through a symbolic link"
    return None
