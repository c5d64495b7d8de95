"""`verify DIR`: re-hash every file of an artifact against its manifest.

The manifest lists every file of the artifact but itself; a changed, missing or unlisted file (a `serve.sh`
added at the root, a forged report.json), a symbolic link or a special file anywhere is a difference.
Every path the artifact names (manifest `files`, paths its target records in model/, e.g. genai_config.json's
decoder file) must be relative and stay inside the artifact; anything else means the artifact was damaged or
tampered with, and nothing is read through it. manifest.json cannot list its own hash: whoever rewrites it can
make anything verify, so verify prints its sha256 and `--expect DIGEST` compares it with one kept elsewhere
(e.g. the one printed by the build, or stored next to where the artifact is published).
"""

from __future__ import annotations

from pathlib import Path

from lorafast_export.errors import InputError
from lorafast_export.manifest import MANIFEST_NAME, read_manifest, walk
from lorafast_export.paths import outside_reason
from lorafast_export.safeio import sha256_file


def _escapes(artifact: Path, man: dict) -> list[str]:
    """Every path the manifest or the target's own files name that leaves the artifact."""
    from lorafast_export.targets.registry import recorded_path_problems

    out = [
        f"manifest.json files: {f['path']!r} {why}"
        for f in man["files"]
        if (why := outside_reason(artifact, f["path"]))
    ]
    name = ((man.get("recipe") or {}).get("target") or {}).get("name")
    if isinstance(name, str):
        out += [f"model/{p}" for p in recorded_path_problems(name, artifact / "model")]
    return out


def verify_artifact(artifact: Path, expect: str | None = None) -> dict:
    man = read_manifest(artifact)
    escapes = _escapes(artifact, man)
    if escapes:
        raise InputError(
            f"{artifact}: what it names escapes the artifact directory; it is damaged or was tampered "
            "with (nothing was read through these paths):\n  - " + "\n  - ".join(escapes)
        )
    files, links, other = walk(artifact)
    present = set(files)
    listed = {f["path"]: f["sha256"] for f in man["files"]}
    missing = sorted(rel for rel in listed if rel not in present)
    # only regular files, never through a link, are hashed (a FIFO or /dev/zero planted there is not read)
    changed = sorted(
        rel for rel, digest in listed.items() if rel in present and sha256_file(artifact / rel) != digest
    )
    extra = sorted([*(present - set(listed)), *other])
    digest = sha256_file(artifact / MANIFEST_NAME)
    wrong_manifest = (
        [f"{MANIFEST_NAME} (sha256 {digest}, expected {expect})"] if expect and expect != digest else []
    )
    return {
        "artifact": str(artifact),
        "files": len(listed),
        "manifest_sha256": digest,
        "changed": [*wrong_manifest, *changed],
        "missing": missing,
        "extra": extra,
        "links": links,
        "ok": not (changed or missing or extra or links or wrong_manifest),
    }
