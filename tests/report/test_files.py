"""Report files are written inside their directory only: never through '..', absolute paths or links."""

from __future__ import annotations

import pytest

from lorafast_export.errors import InputError
from lorafast_export.report.files import write_inside


def test_writes_inside(tmp_path):
    [p] = write_inside(tmp_path / "out", {"reports/junit.xml": "<x/>"})
    assert p == tmp_path / "out" / "reports" / "junit.xml" and p.read_text() == "<x/>"


@pytest.mark.parametrize("rel", ["/tmp/x.md", "../x.md", "a/../../x.md", "~/x.md"])
def test_refuses_paths_that_leave(tmp_path, rel):
    with pytest.raises(InputError, match="not written"):
        write_inside(tmp_path / "out", {rel: "x"})
    assert not (tmp_path / "x.md").exists()


def test_never_writes_through_a_planted_link(tmp_path):
    """A downloaded artifact whose report.json links to a file of yours: re-validating it must not overwrite it."""
    (tmp_path / "out").mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("yours")
    (tmp_path / "out" / "report.json").symlink_to(victim)
    (tmp_path / "out" / "sub").symlink_to(tmp_path)
    for rel in ("report.json", "sub/victim.txt"):
        with pytest.raises(InputError, match="symbolic link"):
            write_inside(tmp_path / "out", {"report.md": "new", rel: "overwritten"})
    assert victim.read_text() == "yours"
    assert not (tmp_path / "out" / "report.md").exists()  # every path is checked before anything is written
