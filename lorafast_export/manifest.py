"""The artifact's manifest.json: what it is, and every file in it with its sha256.

`files` lists every file of the artifact except manifest.json itself (model/, reports, the JUnit file), so
`verify` can tell a changed, missing or added file. manifest.json cannot hash itself: its integrity is
checked only against a digest kept elsewhere (build and verify print `manifest sha256`; `verify --expect`
compares it). `--force` replaces a directory only when this module recognises it as an artifact: our schema,
and nothing in it but what the manifest lists.
"""

from __future__ import annotations

import json
import os
import platform
import re
import stat
from importlib import metadata
from pathlib import Path

from lorafast_export import __version__
from lorafast_export.errors import InputError
from lorafast_export.safeio import LIMITS, read_text, sha256_file, write_atomic

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = "lorafast-export/manifest/v2"
OLD_SCHEMAS = ("lorafast-export/manifest/v1",)  # v1 listed model/ only; reports were unlisted
V1_UNLISTED = ("report.json", "report.md", "report.html")
VERSIONED = (  # the libraries whose versions a manifest records (and the merge cache key includes)
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "onnxruntime",
    "onnxruntime-genai",
    "openvino",
    "openvino-genai",
    "nvidia-modelopt",
)


def library_versions() -> dict[str, str]:
    out = {"lorafast-export": __version__, "python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def read_manifest(artifact: Path, old_ok: bool = False) -> dict:
    """manifest.json of an artifact, checked: a JSON object of our schema with a well-formed `files` list."""
    path = artifact / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"{artifact}: no manifest.json; not a finished lorafast-export artifact.")
    try:
        man = json.loads(read_text(path, "manifest", LIMITS["manifest"]))
    except json.JSONDecodeError:
        raise InputError(f"{path}: damaged manifest (not JSON); rebuild the artifact.") from None
    schema = man.get("schema") if isinstance(man, dict) else None
    if schema != MANIFEST_SCHEMA and not (old_ok and schema in OLD_SCHEMAS):
        known = MANIFEST_SCHEMA if not old_ok else ", ".join((MANIFEST_SCHEMA, *OLD_SCHEMAS))
        raise InputError(
            f"{path}: schema {schema!r} is not a lorafast-export manifest this version reads ({known}). "
            + ("Rebuild the artifact." if schema in OLD_SCHEMAS else "This is not one of our artifacts.")
        )
    files = man.get("files")
    if not isinstance(files, list) or not all(
        isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("sha256"), str)
        for f in files
    ):
        raise InputError(f"{path}: damaged manifest (`files` must be a list of {{path, sha256}}).")
    paths = [f["path"] for f in files]
    if len(set(paths)) != len(paths):
        twice = sorted({p for p in paths if paths.count(p) > 1})
        raise InputError(f"{path}: damaged manifest (listed more than once: {', '.join(twice)}).")
    return man


def recorded_recipe(man: dict, artifact: Path) -> dict:
    """The recipe the artifact was built from (read_manifest's dict), as recorded; a manifest without one is
    damaged."""
    recipe = man.get("recipe")
    if not isinstance(recipe, dict):
        raise InputError(f"{artifact / MANIFEST_NAME}: damaged manifest (no recipe); rebuild the artifact.")
    return recipe


def recorded_target(man: dict, artifact: Path) -> str:
    """The name of the target the artifact was built for."""
    target = recorded_recipe(man, artifact).get("target")
    name = target.get("name") if isinstance(target, dict) else None
    if not isinstance(name, str):
        raise InputError(f"{artifact / MANIFEST_NAME}: damaged manifest (no recipe.target.name).")
    return name


def file_entries(root: Path, rels: list[str]) -> list[dict]:
    return [
        {"path": rel, "sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}
        for rel in sorted(rels)
    ]


def walk(root: Path) -> tuple[list[str], list[str], list[str]]:
    """(regular files, symbolic links, other non-regular entries) under root, relative, never following links;
    manifest.json itself is left out."""
    files, links, other = [], [], []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                links.append(f"{rel} -> {os.readlink(p)}")
            elif stat.S_ISREG(mode):
                files.append(rel)
            elif not stat.S_ISDIR(mode):
                other.append(rel)
    return sorted(f for f in files if f != MANIFEST_NAME), sorted(links), sorted(other)


def write_manifest(root: Path, manifest: dict) -> None:
    """Write manifest.json with `files` covering every file now under root (call it after the last write)."""
    files, links, other = walk(root)
    if links or other:  # we never write these; a target that did would make an unverifiable artifact
        raise RuntimeError(f"{root}: the build wrote links or special files: {links + other}")
    manifest = {"schema": MANIFEST_SCHEMA, **manifest, "files": file_entries(root, files)}
    write_atomic(root / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")


def record_files(artifact: Path, rels: list[str]) -> None:
    """Re-hash files this run (re)wrote into an existing artifact (validate's reports) into its manifest."""
    man = read_manifest(artifact, old_ok=True)
    fresh = {e["path"]: e for e in file_entries(artifact, [r for r in rels if (artifact / r).is_file()])}
    kept = [f for f in man["files"] if f["path"] not in fresh]
    man["files"] = sorted([*kept, *fresh.values()], key=lambda f: f["path"])
    write_atomic(artifact / MANIFEST_NAME, json.dumps(man, indent=2) + "\n")


def unlisted(artifact: Path, man: dict) -> list[str]:
    """What lies in the artifact that its manifest does not list (links and special files included)."""
    files, links, other = walk(artifact)
    listed = {f["path"] for f in man["files"]}
    if man.get("schema") in OLD_SCHEMAS:
        junit = ((man.get("recipe") or {}).get("validate") or {}).get("junit")
        listed |= {*V1_UNLISTED, *([junit] if isinstance(junit, str) else [])}
    return sorted([*(f for f in files if f not in listed), *links, *other])


def replace_refusal(out: Path) -> str | None:
    """Why --force must not replace `out` (None: it is empty, or one of our artifacts and nothing else)."""
    if out.is_symlink():
        return "is a symbolic link"
    if not out.is_dir():
        return "exists and is not a directory"
    if not any(out.iterdir()):
        return None
    if not (out / MANIFEST_NAME).is_file():
        return "is not a lorafast-export artifact (no manifest.json)"
    try:
        man = read_manifest(out, old_ok=True)
    except InputError as e:
        return f"has a manifest.json that is not ours ({str(e).split(': ', 1)[-1]})"
    extra = unlisted(out, man)
    if extra:
        shown = ", ".join(extra[:5]) + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else "")
        return f"holds files its manifest does not list ({shown}); they would be deleted"
    return None


def locate_inputs(recipe: dict, man: dict, artifact: Path) -> dict:
    """The manifest's recipe with each input path replaced by one that exists from here: the absolute path
    recorded at build time, else the path relative to the artifact (both moved together), else as written."""
    recorded = man.get("input_paths")
    if not isinstance(recorded, dict):
        return recipe
    for field, where in recorded.items():
        if not isinstance(where, dict):
            continue
        candidates = [Path(str(where.get("absolute", ""))), artifact / str(where.get("relative", ""))]
        found = next((p for p in candidates if p.parts and p.exists()), None)
        if found is not None:
            _set_field(recipe, field, str(found))
    return recipe


def _set_field(d: dict, field: str, value: str) -> None:
    """Set a recipe field named like `inputs.adapters[0].path`; a field the recipe lacks is left alone."""
    *parents, leaf = re.findall(r"[^.\[\]]+", field)
    node = d
    for part in parents:
        try:
            node = node[int(part)] if part.isdigit() else node[part]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(node, list) and leaf.isdigit() and int(leaf) < len(node):
        node[int(leaf)] = value
    elif isinstance(node, dict) and leaf in node:
        node[leaf] = value
