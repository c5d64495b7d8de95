"""`verify DIR`: re-hash an artifact's files against its manifest."""

from __future__ import annotations

import json
from pathlib import Path

from lorafast_export.errors import InputError
from lorafast_export.load import sha256_file


def inside(root: Path, rel: str) -> Path:
    """root/rel, refusing paths that escape root (absolute, '..', or through symlinks)."""
    p = (root / rel).resolve()
    if Path(rel).is_absolute() or not p.is_relative_to(root.resolve()):
        raise InputError(f"{root}/manifest.json: path {rel!r} escapes the artifact directory; the manifest is "
                         "damaged or was tampered with.")
    return p


def verify_artifact(artifact: Path) -> dict:
    man_path = artifact / "manifest.json"
    if not man_path.is_file():
        raise InputError(f"{artifact}: no manifest.json; not a finished lorafast-export artifact.")
    try:
        files = json.loads(man_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InputError(f"{man_path}: damaged manifest (no 'files' list).") from None
    listed = {f["path"]: f["sha256"] for f in files}
    changed, missing = [], []
    for rel, digest in listed.items():
        p = inside(artifact, rel)
        if not p.is_file():
            missing.append(rel)
        elif sha256_file(p) != digest:
            changed.append(rel)
    present = {str(p.relative_to(artifact)) for p in (artifact / "model").rglob("*") if p.is_file()}
    extra = sorted(present - set(listed))
    return {"artifact": str(artifact), "files": len(listed), "changed": changed, "missing": missing,
            "extra": extra, "ok": not (changed or missing or extra)}
