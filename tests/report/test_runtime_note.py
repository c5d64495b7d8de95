"""A note on the artifact stage's runtime (our reader instead of transformers / TensorRT-LLM) is visible in every
report format, and absent when the target's own runtime ran."""

from __future__ import annotations

import json

from lorafast_export.report.html import render_html
from lorafast_export.report.json_report import parse_report, to_json
from lorafast_export.report.markdown import render_markdown
from lorafast_export.targets.hf.target import QuantizedReaderSession

NOTE = QuantizedReaderSession.runtime_note


def _with_note(report, note):
    return report.model_copy(update={"artifact": report.artifact.model_copy(update={"runtime_note": note})})


def test_the_hf_reader_note_says_what_ran_instead():
    assert "transformers itself was not run" in NOTE and "pip install gptqmodel" in NOTE


def test_note_in_markdown_next_to_the_verdict(sample_report):
    lines = render_markdown(_with_note(sample_report, NOTE)).splitlines()
    note_at = lines.index(f"> **Note:** {NOTE}")
    assert note_at < next(
        i for i, line in enumerate(lines) if line.startswith("| Stage |")
    )  # before the table
    assert "Note:" not in render_markdown(sample_report)


def test_note_in_html_header_escaped(sample_report):
    html = render_html(_with_note(sample_report, "read by <our reader> & not by the runtime"))
    header = html[html.index("<header>") : html.index("</header>")]
    assert (
        '<p class="runtime-note"><b>Note:</b> read by &lt;our reader&gt; &amp; not by the runtime</p>'
        in header
    )
    assert 'runtime-note"' not in render_html(sample_report)


def test_note_in_json_round_trips(sample_report):
    text = to_json(_with_note(sample_report, NOTE))
    assert json.loads(text)["artifact"]["runtime_note"] == NOTE
    assert parse_report(text).artifact.runtime_note == NOTE
