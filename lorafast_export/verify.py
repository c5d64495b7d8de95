"""`verify DIR`: re-hash an artifact's files against its manifest.

Every path the artifact names (manifest `files`, paths its target records in model/, e.g. genai_config.json's
decoder file) must be relative and stay inside the artifact; anything else means the artifact was damaged or
tampered with, and nothing is read through it. A built artifact holds no symbolic links (inputs are copied, not
linked), so any link under model/ is reported as a difference.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorafast_export.errors import InputError
from lorafast_export.recipe import outside_reason
from lorafast_export.weights import sha256_file


def _read_manifest(artifact: Path) -> dict:
    man_path = artifact / "manifest.json"
    if not man_path.is_file():
        raise InputError(f"{artifact}: no manifest.json; not a finished lorafast-export artifact.")
    try:
        man = json.loads(man_path.read_text())
        listed = {f["path"]: f["sha256"] for f in man["files"]}
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InputError(f"{man_path}: damaged manifest (no 'files' list).") from None
    if not all(isinstance(p, str) for p in listed):
        raise InputError(f"{man_path}: damaged manifest (a 'files' path is not a string).")
    return man | {"files": listed}


def _escapes(artifact: Path, man: dict) -> list[str]:
    """Every path the manifest or the target's own files name that leaves the artifact."""
    from lorafast_export.targets.registry import all_targets, get_target, recorded_path_problems

    out = [
        f"manifest.json files: {rel!r} {why}"
        for rel in man["files"]
        if (why := outside_reason(artifact, rel))
    ]
    name = ((man.get("recipe") or {}).get("target") or {}).get("name")
    if name in all_targets():
        out += [f"model/{p}" for p in recorded_path_problems(get_target(name), artifact / "model")]
    return out


def _links(model_dir: Path) -> list[str]:
    """Symbolic links under model/ (not followed), as 'model/x -> target'."""
    found = []
    for dirpath, dirnames, filenames in os.walk(model_dir):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            if p.is_symlink():
                found.append(f"{p.relative_to(model_dir.parent)} -> {os.readlink(p)}")
    return sorted(found)


def verify_artifact(artifact: Path) -> dict:
    man = _read_manifest(artifact)
    escapes = _escapes(artifact, man)
    if escapes:
        raise InputError(
            f"{artifact}: what it names escapes the artifact directory; it is damaged or was tampered "
            "with (nothing was read through these paths):\n  - " + "\n  - ".join(escapes)
        )
    listed = man["files"]
    changed, missing = [], []
    for rel, digest in listed.items():
        p = artifact / rel  # inside: checked above
        if not p.is_file():
            missing.append(rel)
        elif sha256_file(p) != digest:
            changed.append(rel)
    present = {str(p.relative_to(artifact)) for p in (artifact / "model").rglob("*") if p.is_file()}
    extra = sorted(present - set(listed))
    links = _links(artifact / "model")
    return {
        "artifact": str(artifact),
        "files": len(listed),
        "changed": changed,
        "missing": missing,
        "extra": extra,
        "links": links,
        "ok": not (changed or missing or extra or links),
    }
