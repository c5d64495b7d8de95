"""report.json: write and read (validated against the versioned schema)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lorafast_export.errors import InputError
from lorafast_export.report.schema import SCHEMA_ID, Report
from lorafast_export.safeio import LIMITS, read_text


def to_json(report: Report) -> str:
    return report.model_dump_json(by_alias=True, indent=2) + "\n"


def write_json(report: Report, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(to_json(report), encoding="utf-8")
    return path


def parse_report(data: dict[str, Any] | str, source: str = "report") -> Report:
    """A Report from a dict or JSON text; InputError names the schema mismatch and the offending fields."""
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except (json.JSONDecodeError, RecursionError) as err:
            raise InputError(f"{source}: not valid JSON ({err})") from None
    found = data.get("schema") if isinstance(data, dict) else None
    if found != SCHEMA_ID:
        raise InputError(
            f"{source}: schema is {found!r}, expected {SCHEMA_ID!r}; regenerate it with this version"
        )
    try:
        return Report.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise InputError(f"{source}: does not match {SCHEMA_ID}: {problems}") from None


def read_json(path: str | Path) -> Report:
    path = Path(path)
    if not path.exists():
        raise InputError(f"report: {path} does not exist; point to the report.json of a finished build")
    return parse_report(read_text(path, "report", LIMITS["report"]), source=str(path))
