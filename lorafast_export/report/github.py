"""GitHub Actions: append the Markdown summary to the job summary file when running there."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from lorafast_export.report.markdown import render_markdown
from lorafast_export.report.schema import Report

SUMMARY_ENV = "GITHUB_STEP_SUMMARY"


def append_step_summary(report: Report, env: Mapping[str, str] | None = None) -> Path | None:
    """Append report.md to $GITHUB_STEP_SUMMARY; returns the file written, or None outside GitHub Actions."""
    target = (os.environ if env is None else env).get(SUMMARY_ENV)
    if not target:
        return None
    path = Path(target)
    with path.open("a", encoding="utf-8") as f:
        f.write(render_markdown(report) + "\n")
    return path
