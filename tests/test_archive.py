"""Archived runs: the manifest catches changes, and reports re-render byte for byte."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import committed_archives

from fusedqk import archive, report

ARCHIVES = committed_archives()


def test_the_committed_archives_are_found():
    # Without this an empty list (a relative glob from another folder, say) would pass them all.
    assert len(ARCHIVES) >= 10 and {p.parent.name.split("-")[0] for p in ARCHIVES} >= {"cpu", "cuda"}


@pytest.mark.parametrize("run", ARCHIVES, ids=[str(p) for p in ARCHIVES])
def test_committed_archives_verify_and_re_render_identically(run, tmp_path):
    assert archive.verify(run) == []
    out = tmp_path / "elsewhere"
    report.render_run(run, out)
    # The text is rendered from the raw files alone: byte for byte the archived one. The HTML
    # embeds PNGs, whose bytes depend on the matplotlib build, so it must only come back.
    assert (out / "report.md").read_bytes() == (run / "report.md").read_bytes()
    html = (out / "report.html").read_text()
    decisions = json.loads((run / "decisions.json").read_text())
    for backend, d in decisions["backends"].items():
        assert f"{backend}: {d['recommendation'].upper()}" in html
    for model in {p.parent.name for p in run.glob("*/status-bench.json")}:
        assert f"<td>{model}</td>" in html
    assert archive.verify(run) == []  # the sealed run itself was not touched


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


def _render_cpu_archive_with(tmp_path, edit, results="*/identity-*.json"):
    """(the CPU archive, a copy of it re-rendered after ``edit`` changed each of its ``results``
    files: by default the identity results)."""
    run = next(p for p in ARCHIVES if p.parent.name.startswith("cpu-"))
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    (copy / archive.MANIFEST).unlink()  # an edited copy is no longer the sealed run
    for path in copy.glob(results):
        doc = json.loads(path.read_text())
        edit(doc)
        path.write_text(json.dumps(doc))
    report.render_run(copy)
    return run, copy


def test_report_says_when_identity_kept_attention_off_cudnn(tmp_path):
    run, copy = _render_cpu_archive_with(
        tmp_path, lambda doc: doc["settings"].update(cudnn_sdpa=False))
    assert "Attention ran on MLX's own kernel throughout" in (copy / "report.md").read_text()
    assert "Attention ran on MLX's own kernel" not in (run / "report.md").read_text()


def test_report_says_what_the_controls_repeated(tmp_path):
    """Results since commit f9cd32d name the controls' scope; archives from before do not, and their
    reports keep their words."""
    from fusedqk.identity import CONTROL_SCOPE

    run, copy = _render_cpu_archive_with(
        tmp_path, lambda doc: doc["controls"].update(scope=CONTROL_SCOPE))
    said = f"A control repeats the path's {CONTROL_SCOPE} in a fresh process"
    assert said in (copy / "report.md").read_text()
    assert "A control repeats" not in (run / "report.md").read_text()


def test_report_names_a_speedup_that_moved_during_its_run(tmp_path):
    """Benches since commit 703a49a record the halves of their rounds; the report lists the speedups
    whose halves disagree, and archives from before keep their words."""
    from fusedqk import stats

    moved = stats.Halves((1.07, 1.05, 1.10), (1.17, 1.13, 1.21)).as_dict()

    def edit(doc):
        for sp in doc["speedups"]:
            sp["halves"] = moved

    run, copy = _render_cpu_archive_with(tmp_path, edit, "*/bench/bench.json")
    text = (copy / "report.md").read_text()
    assert "A speedup that moved during its run" in text
    assert "first half of the rounds 1.070 [1.050, 1.100], second half 1.170 [1.130, 1.210]" in text
    assert "moved during" not in (run / "report.md").read_text()


def _follows_the_host(doc):
    from fusedqk import stats

    for sp in doc["speedups"]:
        sp["host_states"] = stats.Halves((1.15, 1.12, 1.18), (1.34, 1.30, 1.38)).as_dict()
        sp["host_states_by"] = stats.HOST_STATES_BY


def _followed_the_graph_path(doc):
    """A bench written before the split used both paths' time: it sorted by graph's alone."""
    _follows_the_host(doc)
    for sp in doc["speedups"]:
        del sp["host_states_by"]


def _ran_as_another(doc):
    doc["meta"]["substitutes"] = {"kernel_kv": {"runs_as": "kernel", "why": "no primitive"}}


@pytest.mark.parametrize("edit, heading, line", [
    (_follows_the_host, "A speedup that follows the host's speed",
     "1.150 [1.120, 1.180] in the half of the rounds where both paths decoded fastest"),
    (_followed_the_graph_path, "A speedup that follows the host's speed",
     "1.150 [1.120, 1.180] in the half of the rounds where graph decoded fastest"),
    # kernel_kv without the C++ primitive runs as kernel: named, not passed off as itself.
    (_ran_as_another, "Paths that ran as another implementation",
     "kernel_kv ran as kernel: no primitive"),
])
def test_both_reports_say_what_a_bench_recorded_about_its_paths(edit, heading, line, tmp_path):
    run, copy = _render_cpu_archive_with(tmp_path, edit, "*/bench/bench.json")
    for name in ("report.md", "report.html"):
        assert heading in (copy / name).read_text() and line in (copy / name).read_text()
        assert heading not in (run / name).read_text()


def test_the_html_report_says_what_was_measured_and_how(tmp_path):
    run = next(p for p in ARCHIVES if p.parent.name.startswith("cpu-"))
    report.render_run(run, tmp_path)
    html = (tmp_path / "report.html").read_text()
    headline = html.split('<p class="headline"><strong>')[1].split("</strong>")[0]
    assert headline.startswith("Leave the cpu default as it is") and "2 models" in headline
    assert "Workload: Prompt 16 tokens, 24 generated (greedy), batch 1" in html
    assert "4-bit weights in groups of 64, bfloat16 activations, synthetic deterministic weights" in html
    assert "p (Wilcoxon, paired by round)" in html and "Mann-Whitney" not in html
    for column in ("prefill tok/s (median)", "peak memory", "<th>p50</th>", "<th>p99</th>"):
        assert column in html, column
    assert " GiB</td>" in html and "<details><summary>Provenance" in html
    # smallest model first in the per-model table
    table = html.split("</table>")[0]
    assert table.index("qwen3-tiny") < table.index("qwen3-moe-tiny")
    assert html.count('<img alt="') == 3


def test_result_files_get_the_callers_umask(tmp_path):
    from fusedqk.atomic import write_json, write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.md", "a")
        write_json(tmp_path / "b.json", {"b": 1})
        os.umask(0o027)
        write_text(tmp_path / "c.md", "c")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"a.md": 0o644, "b.json": 0o644, "c.md": 0o640}


def test_the_html_report_keys_one_colour_per_path_in_every_plot(tmp_path):
    run = committed_archives("cuda-nvidia-h200/*")[0]
    report.render_run(run, tmp_path / "out")
    html = (tmp_path / "out" / "report.html").read_text()
    for path in ("graph", "kernel", "composite"):
        assert f'data-path="{path}" style="color:{report.PATH_COLOURS[path]}"' in html
    assert len(set(report.PATH_COLOURS.values())) == len(report.PATH_COLOURS)


def test_the_report_names_environment_rows_in_words_and_explains_the_floor(tmp_path):
    run = next(p for p in ARCHIVES if p.parent.name.startswith("cpu-"))
    report.render_run(run, tmp_path / "out")
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<th>memory total</th><td>23.5 GiB</td>" in html and "memory_total_bytes" not in html
    assert "Floor µs: the time to read the block's QKV weight" in html and "× floor is" in html


@pytest.mark.parametrize("tag", ["fusedqk-bench/²", "fusedqk-bench/\uff12", "fusedqk-bench/٢"])
def test_a_format_version_in_other_digits_is_one_line(tag):
    """Superscript, full-width or Arabic-Indic digits pass str.isdigit but are no version."""
    from fusedqk import formats
    from fusedqk.errors import UserError

    with pytest.raises(UserError, match="is not a fusedqk bench format"):
        formats.version("bench", {"format": tag}, "bench.json")


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_manifest_that_lists_a_file_twice_fails_verification(tmp_path, where):
    """A wrong digest beside the right one, in either order, or the same line twice: never a
    run that verifies."""
    import shutil

    from conftest import committed_archives

    from fusedqk import archive

    run = tmp_path / "run"
    shutil.copytree(committed_archives("cpu-*/*")[-1], run)
    manifest = run / archive.MANIFEST
    lines = manifest.read_text().splitlines()
    name = lines[0].split("  ", 1)[1]
    forged = f"{'0' * 64}  {name}"
    lines = [forged, *lines] if where == "before" else [*lines, forged]
    manifest.write_text("\n".join(lines) + "\n")
    assert any("twice" in p for p in archive.verify(run))


def test_a_set_of_result_files_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A full disk part-way through a benchmark's files (here the third write fails) leaves
    none of them, not trials.csv without bench.json, and says so in one line."""
    import errno
    import os as os_module

    from fusedqk import atomic
    from fusedqk.errors import UserError

    real, calls = os_module.fdopen, []

    def filling(fd, *args, **kwargs):
        calls.append(fd)
        if len(calls) == 3:
            os_module.close(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "fdopen", filling)
    out = tmp_path / "bench"
    with pytest.raises(UserError, match=r"No space left on device\); nothing of this set"):
        atomic.write_files({out / "trials.csv": "a", out / "tokens.csv": "b", out / "bench.json": "{}"})
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("plant", ["non-utf8-name", "manifest-folder"])
def test_sealing_a_run_it_could_not_verify_is_one_line(tmp_path, plant):
    import os
    import shutil

    from conftest import committed_archives

    from fusedqk import archive, cli

    run = tmp_path / "run"
    shutil.copytree(committed_archives("cpu-*/*")[-1], run)
    (run / archive.MANIFEST).unlink()
    if plant == "non-utf8-name":
        (Path(os.fsdecode(bytes(run) + b"/caf\xe9.txt"))).write_text("x")
    else:
        (run / archive.MANIFEST).mkdir()
    assert cli.main(["verify", "--write", str(run)]) == 2
