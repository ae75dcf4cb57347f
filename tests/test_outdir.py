"""One output-directory policy for quantize, cliff, build-engine and report."""

from __future__ import annotations

import pytest

from omniquant.errors import EngineError, ExportError, ReportError
from omniquant.outdir import check_out


def test_the_output_directory_policy(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    spares = ((src, "model checkpoint"),)
    check_out(tmp_path / "new", force=False, spares=spares)  # a fresh directory: fine
    with pytest.raises(ExportError, match="contains the model checkpoint .*would delete it"):
        check_out(tmp_path, force=True, spares=spares)
    check_out(src / "inside", force=False, spares=spares)  # inside the source: allowed...
    with pytest.raises(EngineError, match="must not contain, or be inside, the checkpoint"):
        check_out(src / "inside", force=False, error=EngineError, spares=((src, "checkpoint"),),
                  nested=True)  # fmt: skip
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="exists and is not a directory"):
        check_out(tmp_path / "file", force=True)
    (tmp_path / "old").mkdir()
    with pytest.raises(ExportError, match=r"already exists; pass force to overwrite it\.$"):
        check_out(tmp_path / "old", force=False)
    check_out(tmp_path / "old", force=True)
    with pytest.raises(ExportError, match="parent directory .* does not exist"):
        check_out(tmp_path / "no" / "out", force=False)


def test_a_shared_directory_only_guards_the_outputs_files(tmp_path):
    files = ("report.json", "report.md")
    (tmp_path / "notes.txt").write_text("mine")
    check_out(tmp_path, force=False, error=ReportError, files=files)  # other files: fine
    (tmp_path / "report.md").write_text("old")
    with pytest.raises(ReportError, match="already holds report.md; pass force to overwrite"):
        check_out(tmp_path, force=False, error=ReportError, files=files)
    check_out(tmp_path, force=True, error=ReportError, files=files)
