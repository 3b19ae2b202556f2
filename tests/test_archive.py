"""Archived runs: the manifest catches changes, and reports re-render byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fusedqk import archive, report

ARCHIVES = sorted(p for p in Path("results").glob("*/*") if (p / "MANIFEST.sha256").is_file())


@pytest.mark.parametrize("run", ARCHIVES, ids=[str(p) for p in ARCHIVES])
def test_committed_archives_verify_and_re_render_identically(run, tmp_path):
    assert archive.verify(run) == []
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    report.render_run(copy)
    for name in ("report.md", "report.html", "plots/throughput.png"):
        if (run / name).exists():
            assert (copy / name).read_bytes() == (run / name).read_bytes(), name
    assert archive.verify(copy) == []


def test_manifest_catches_changed_missing_and_extra_files(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.csv").write_text("b")
    assert archive.write_manifest(tmp_path) == 2
    assert archive.verify(tmp_path) == []
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "sub" / "b.csv").unlink()
    (tmp_path / "c.json").write_text("{}")
    assert sorted(archive.verify(tmp_path)) == ["changed: a.txt", "missing: sub/b.csv",
                                                "not in manifest: c.json"]


def test_atomic_writes_leave_no_partial_file(tmp_path):
    from fusedqk.atomic import write_with

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_with(tmp_path / "out.csv", boom)
    assert list(tmp_path.iterdir()) == []
