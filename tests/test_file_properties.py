"""Property tests over files a user hands fusedqk: engine files and run folders of wrong shapes.
Whatever hypothesis makes of them, fusedqk either accepts them or refuses them in one line naming
the file; it never raises anything else (a traceback to the user)."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest
import yaml
from conftest import ROOT, committed_archives
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusedqk import archive, cli
from fusedqk.engines.command import load_engine
from fusedqk.errors import UserError

ENGINES = sorted((ROOT / "config" / "engines").glob("*.yaml"))
CPU_ARCHIVE = committed_archives("cpu-*/*")[-1]

# JSON/YAML values of every shape: what a careless edit or a hostile file may put anywhere.
values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)


def _paths(doc: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a nested document."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _replace(doc: object, path: tuple, value: object, delete: bool) -> None:
    *parents, last = path
    for key in parents:
        doc = doc[key]
    if delete:
        del doc[last]
    else:
        doc[last] = value


def _one_line(message: str, source: str) -> None:
    assert "\n" not in message and source in message, message


PROPERTY = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("engine", ENGINES, ids=[p.stem for p in ENGINES])
@PROPERTY
@given(data=st.data())
def test_an_engine_file_of_any_shape_loads_or_is_one_line(engine, data, tmp_path):
    doc = yaml.safe_load(engine.read_text())
    paths = _paths(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        with contextlib.suppress(KeyError, IndexError, TypeError):  # gone after an earlier change
            _replace(doc, path, data.draw(values), delete=data.draw(st.booleans()))
        paths = _paths(doc) or [("name",)]
    target = tmp_path / "engine.yaml"
    target.write_text(yaml.safe_dump(doc) if data.draw(st.booleans()) else json.dumps(doc))
    try:
        load_engine(target)
    except UserError as e:
        _one_line(str(e), str(target))


@PROPERTY
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_an_engine_file_of_any_text_loads_or_is_one_line(text, tmp_path):
    target = tmp_path / "engine.yaml"
    target.write_bytes(text.encode("utf-8", "surrogateescape"))
    try:
        load_engine(target)
    except UserError as e:
        _one_line(str(e), str(target))


RUN_FILES = sorted(p.relative_to(CPU_ARCHIVE) for p in CPU_ARCHIVE.rglob("*.json")
                   if p.name != "environment.json")


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(RUN_FILES), value=values, cut=st.booleans())
def test_a_damaged_run_re_renders_or_is_one_line(name, value, cut, tmp_path_factory, capsys):
    run = tmp_path_factory.mktemp("run") / "run"
    shutil.copytree(CPU_ARCHIVE, run)
    (run / archive.MANIFEST).unlink()
    target = run / name
    if cut:
        target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 3])
    else:
        target.write_text(json.dumps(value))
    out = run.parent / "out"
    code = cli.main(["report", "--from", str(run), "--out", str(out)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    if code != 0:
        assert len(lines) == 1 and lines[0].startswith("fusedqk: error:"), err
        assert not out.exists() or not any(out.iterdir())
