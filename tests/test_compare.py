"""fusedqk compare: archived runs side by side, and results/README.md kept current."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import RESULTS, committed_archives

from fusedqk import archive, cli, compare
from fusedqk.errors import UserError

H100 = RESULTS / "cuda-nvidia-h100-80gb-hbm3"
H200 = RESULTS / "cuda-nvidia-h200"
CPU = RESULTS / "cpu-x86-64/20261126-bc15596bc7"


def test_results_readme_lists_every_committed_run_and_is_current():
    text = (RESULTS / "README.md").read_text()
    assert compare.index(RESULTS, committed_only=True) == text, \
        "run `fusedqk compare --index results --committed > results/README.md`"
    runs = committed_archives()
    assert len(runs) >= 14
    for run in runs:
        assert f"`{run.relative_to(RESULTS).as_posix()}`" in text


def test_a_users_own_run_is_listed_as_theirs_and_keeps_the_readme_current(tmp_path):
    # A run the user made lands in results/ beside the committed ones: the index marks it as
    # theirs, and the committed list does not change. (In a git checkout of its own, so that no
    # other test sees the repository's results/ change.)
    import subprocess

    results = tmp_path / "results"
    shutil.copytree(CPU, results / "cpu-x86-64" / CPU.name)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "committed"], check=True)
    committed = compare.index(results, committed_only=True)
    shutil.copytree(CPU, results / "cpu-x86-64" / "29991231-usersrun00")
    lines = [ln for ln in compare.index(results).splitlines() if "29991231-usersrun00" in ln]
    assert len(lines) == 1 and "yours: not tracked by git" in lines[0]
    assert compare.index(results, committed_only=True) == committed
    assert "29991231-usersrun00" not in committed and CPU.name in committed


def test_h100_and_h200_runs_side_by_side(capsys):
    # Every H200 archive, the server run of 16-token completions among them: mixed workloads.
    runs = [H100 / "20261127-703a49a8e9-kernel", *sorted(H200.iterdir())]
    assert cli.main(["compare", *map(str, runs), "--by", "device"]) == 2
    assert "different workloads" in capsys.readouterr().err
    assert cli.main(["compare", *map(str, runs), "--by", "device", "--mixed-workloads"]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H100 80GB HBM3 (703a49a8e9)" in out and "NVIDIA H200 (e3538ceb0b)" in out
    assert "0.921 [0.752, 1.174] EQUAL" in out and "1.212 [1.201, 1.225] EQUAL" in out


def test_runs_whose_intervals_do_not_overlap_are_marked_with_what_differs():
    runs = [compare.summarize(H100 / n) for n in ("20261126-05cb964ce6", "20261127-703a49a8e9-kernel")]
    table = compare.compare(runs)
    row = next(r for r in table["rows"] if r["model"] == "qwen3-8b" and r["impl"] == "kernel")
    (apart,) = row["apart"]
    assert apart["runs"] == ["20261126-05cb964ce6", "20261127-703a49a8e9-kernel"]
    assert "commit" in apart["settings_that_differ"]
    assert json.loads(compare.render_comparison(table, "json"))["rows"]
    assert compare.render_comparison(table, "csv").startswith("backend,model,impl,")


def test_the_kernel_call_is_part_of_a_runs_provenance_and_of_what_supersedes_it():
    # The same card, engine and models: through the C++ primitive one run does not supersede
    # the other, made through mx.fast.cuda_kernel, and where their intervals part it is named.
    runs = [compare.summarize(H200 / n) for n in ("20261201-a81f3a50c1", "20261201-b31ecd0bb5")]
    assert [r.kernel_call for r in runs] == ["cuda_kernel", "primitive"]
    row = next(r for r in compare.compare(runs)["rows"]
               if r["model"] == "qwen3-0.6b" and r["impl"] == "kernel")
    assert "kernel_call" in row["apart"][0]["settings_that_differ"]
    lines = {ln.split("`")[1]: ln for ln in compare.index(RESULTS).splitlines()
             if ln.startswith("| [`")}
    assert lines["cuda-nvidia-h200/20261201-a81f3a50c1"].endswith("| current |")
    assert "| cuda_kernel |" in lines["cuda-nvidia-h200/20261201-e3538ceb0b-mlx-lm"]
    assert "| — |" in lines[f"cpu-x86-64/{CPU.name}"]


def _sealed_copy_with(tmp_path: Path, edit) -> Path:
    copy = tmp_path / CPU.name
    shutil.copytree(CPU, copy)
    for path in copy.glob("*/bench/bench.json"):
        doc = json.loads(path.read_text())
        edit(doc)
        path.write_text(json.dumps(doc))
    archive.write_manifest(copy)
    return copy


def test_different_workloads_are_refused_unless_asked(tmp_path):
    other = _sealed_copy_with(tmp_path, lambda d: d["settings"].update(prompt_tokens=99))
    runs = [compare.summarize(CPU), compare.summarize(other)]
    with pytest.raises(UserError, match="different workloads"):
        compare.compare(runs)
    assert compare.compare(runs, mixed_workloads=True)["rows"]


def test_compare_reads_only_archives_that_verify(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(CPU, copy)
    (copy / "summaries.csv").write_text("forged\n")
    with pytest.raises(UserError, match="does not match"):
        compare.summarize(copy)
    (copy / archive.MANIFEST).unlink()
    with pytest.raises(UserError, match="not a sealed archive"):
        compare.summarize(copy)


def test_readme_answer_table_matches_the_archives():
    readme = (RESULTS.parent / "README.md").read_text()
    assert len(readme.splitlines()) < 120
    rows = [ln for ln in readme.splitlines() if ln.startswith("| ") and "`" in ln and "/20" in ln]
    assert len(rows) >= 5
    for row in rows:
        run = RESULTS / row.split("`")[1]
        cells = {f"{c['point']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]"
                 for c in compare.summarize(run).speedups.values()}
        summary = compare.summarize(run)
        # A figure may carry a footnote mark (¹) that the text under the table explains.
        figures = [c.strip().rstrip(" ¹²³") for c in row.split("|")[5:] if "[" in c]
        # A row without figures is a run of models outside the table's columns (the tiny ones).
        assert figures or not {m for m, _ in summary.speedups} & set(SEED_MODELS), row
        for figure in figures:
            assert figure in cells, (run, figure)
        default = row.split("|")[3].strip()
        assert default.startswith("on") == (summary.decision == "on"), (run, default)


SEED_MODELS = ("qwen3-0.6b", "qwen3-8b", "qwen3-30b-a3b")


def test_readme_and_docs_speak_of_the_project_only():
    import re

    words = re.compile(r"session \d|\bcall \d|lent machine|issue \d|issue #", re.I)
    for path in [Path("README.md"), Path("results/README.md"), Path("docs/configuration.md"),
                 Path("docs/engines.md"), Path("docs/formats.md"), Path("docs/kernels.md")]:
        hits = [ln for ln in path.read_text().splitlines() if words.search(ln)]
        assert not hits, (path, hits[:3])


def test_runs_of_one_folder_name_on_two_devices_keep_a_column_each(tmp_path):
    # The same commit measured on two devices: both folders are named <date>-<commit>.
    other = tmp_path / "cpu-other-device" / CPU.name
    shutil.copytree(CPU, other)
    table = compare.compare([compare.summarize(CPU), compare.summarize(other)])
    assert set(table["labels"]) == {f"cpu-x86-64/{CPU.name}", f"cpu-other-device/{CPU.name}"}
    assert all(len([c for c in row["cells"].values() if c]) == 2 for row in table["rows"])


def test_a_run_named_twice_is_refused():
    with pytest.raises(UserError, match="more than once"):
        compare.compare([compare.summarize(CPU), compare.summarize(Path(f"{CPU}/"))])


@pytest.mark.parametrize("layout", [("a/base", "b/base"), ("same/runA", "same/runB"),
                                    ("x/p/base", "y/p/base")])
def test_runs_whose_names_coincide_never_share_a_column(tmp_path, layout):
    """Copies of one run (their decisions name the same evidence), or runs of one name under
    different parents: each keeps a column of its own, and every speedup stays in the table."""
    runs = []
    for rel in layout:
        shutil.copytree(CPU, tmp_path / rel)
        runs.append(compare.summarize(tmp_path / rel))
    table = compare.compare(runs)
    assert len(table["labels"]) == len(layout) == len(set(table["labels"].values()))
    assert all(len([c for c in row["cells"].values() if c]) == len(layout) for row in table["rows"])
    text = compare.render_comparison(table)
    assert all(label in text for label in table["labels"].values())
