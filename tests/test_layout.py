"""The package's layers point one way: no import cycles, and no argparse below the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fusedqk"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every fusedqk module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("fusedqk")}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
# Modules that parse command lines: the CLI, its commands, and mlx-lm's launcher (which hands
# argv to mlx-lm).
COMMAND_MODULES = {"fusedqk.cli", "fusedqk.patched_mlx_lm", "fusedqk.__main__",
                   *(m for m in MODULES if m.startswith("fusedqk.commands"))}
GRAPH = {m: {i for i in imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_the_import_graph_has_no_cycles():
    state: dict[str, str] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = "open"
        for n in sorted(GRAPH[m]):
            if n == "fusedqk":  # the package's own __init__ imports nothing of its own
                continue
            if state.get(n) == "open":
                pytest.fail("import cycle: " + " -> ".join([*trail[trail.index(n):], n]))
            if n not in state:
                visit(n, [*trail, n])
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_only_command_modules_parse_arguments():
    users = {m for m, p in MODULES.items() if "argparse" in {
        a.name for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Import)
        for a in n.names} | {n.module for n in ast.walk(ast.parse(p.read_text()))
                             if isinstance(n, ast.ImportFrom)}}
    assert users <= COMMAND_MODULES, f"argparse below the command line: {sorted(users - COMMAND_MODULES)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_every_module_imports_alone(module):
    # A fresh interpreter per module: an import that only works after another module is a hidden
    # order dependency.
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1:]


def test_the_workflow_planner_does_not_import_mlx():
    # The workflow imports it on hosts that may have no MLX (a login node, a container host).
    proc = subprocess.run([sys.executable, "-c", "import sys, fusedqk.plan; "
                           "print('mlx' in sys.modules)"], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


def test_the_readmes_one_decode_step_is_the_call_stack_of_a_real_step(tmp_path, monkeypatch):
    """README's "one decode step" row names, in order, the package's files on the call stack
    when a decode step of a real `fusedqk bench` reaches the fused path's kernel file (on this
    CPU: the composite, which lives there too), and no other file of the package."""
    from fusedqk.cli import main

    readme = (PACKAGE.parent / "README.md").read_text()
    (row,) = [ln for ln in readme.splitlines() if ln.endswith("| one decode step |")]
    names = [c.strip("` ") for c in row.split("|")[1].split("→")]
    paths = [PACKAGE.parent / names[0]] + [PACKAGE / n for n in names[1:]]
    assert len(paths) <= 5 and all(p.is_file() for p in paths), names
    kernel_file, decode_file = str(paths[-1]), str(PACKAGE / "decode.py")
    stacks: list[list[str]] = []

    def watch(frame, event, arg):
        if event == "call" and frame.f_code.co_filename == kernel_file and not stacks:
            files, f = [], frame
            while f is not None:
                name = f.f_code.co_filename
                if name.startswith(str(PACKAGE)) and (not files or files[-1] != name):
                    files.append(name)
                f = f.f_back
            if decode_file in files:  # a decode step, not the model's build
                stacks.append(files[::-1])

    monkeypatch.setenv("FUSEDQK_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("FUSEDQK_CACHE_DIR", str(tmp_path / "cache"))
    # The composite is built once per layout and process (functools.cache): a test before this
    # one in the same process would leave no Python call into the kernel file to observe.
    from fusedqk.kernels import qkv_norm_rope

    qkv_norm_rope.composite.cache_clear()
    sys.setprofile(watch)
    try:
        code = main(["bench", "-m", "qwen3-tiny", "-p", "4", "-g", "4", "-r", "1", "-w", "1",
                     "--paths", "graph,fused", "--out-dir", str(tmp_path / "bench")])
    finally:
        sys.setprofile(None)
    assert code == 0 and stacks, "no decode step reached the kernel file"
    entry = [f for f in stacks[0] if not f.endswith(("cli.py", "__main__.py"))]
    assert entry == [str(p) for p in paths], [Path(f).relative_to(PACKAGE) for f in entry]


# The layers, bottom up: the kernel is told which call to make (by toggle), never asks; the
# engines produce results (fusedqk.results) and never reach into the built-in engine's
# instrument modules; the readers of results (decide, report, compare) never import a measuring
# module.
MEASURING = {"fusedqk.bench", "fusedqk.identity", "fusedqk.blockbench", "fusedqk.decode",
             "fusedqk.attention", "fusedqk.identity_worker"}
READERS = {"fusedqk.results", "fusedqk.formats", "fusedqk.archive", "fusedqk.decide",
           "fusedqk.report", "fusedqk.compare", "fusedqk.stats"}
FOREIGN_ENGINES = {"fusedqk.engines.command", "fusedqk.engines.server",
                   "fusedqk.engines.process", "fusedqk.external"}


def _reached(module: str) -> set[str]:
    """Every module ``module`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for n in GRAPH[todo.pop()] - seen - {"fusedqk"}:
            seen.add(n)
            todo.append(n)
    return seen


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("fusedqk.kernels")))
def test_the_kernel_does_not_read_the_toggle(module):
    assert "fusedqk.toggle" not in _reached(module)


@pytest.mark.parametrize("module", sorted(READERS))
def test_readers_of_results_import_no_measuring_module(module):
    reached = _reached(module)
    assert not reached & (MEASURING | FOREIGN_ENGINES | {"fusedqk.engines.builtin"}), reached


@pytest.mark.parametrize("module", sorted(FOREIGN_ENGINES))
def test_command_and_server_engines_take_nothing_from_the_builtin_instrument(module):
    direct = GRAPH[module]
    assert not direct & (MEASURING | {"fusedqk.decide", "fusedqk.report"}), direct


def test_one_instrument_takes_every_engines_rounds_and_no_engine_part_runs_rounds():
    """fusedqk.instrument holds the round loop and the summary; the built-in (bench) and the
    engine files' rounds (external) hand it their rounds; engines/ holds parts only (the file
    schema, processes, servers, the in-process build) and neither imports it nor is imported by
    it."""
    feeders = {m for m in MODULES if "fusedqk.instrument" in GRAPH[m]}
    assert {"fusedqk.bench", "fusedqk.external"} <= feeders
    parts = {m for m in MODULES if m.startswith("fusedqk.engines")}
    assert not feeders & parts
    assert not _reached("fusedqk.instrument") & (parts | MEASURING)


def test_every_file_an_image_copies_passes_the_dockerignore():
    """A COPY of something .dockerignore leaves out fails only at build time, on the machine
    that builds the image: each source of each Dockerfile's COPY must be let through."""
    import fnmatch
    import re

    rules = [line.strip() for line in (PACKAGE.parent / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]

    def sent(path: str) -> bool:  # the last matching rule wins, as in Docker and Podman
        keep = True
        for rule in rules:
            negated = rule.startswith("!")
            pattern = rule.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
                keep = negated
        return keep

    for dockerfile in sorted((PACKAGE.parent / "containers").glob("*/Dockerfile")):
        for line in dockerfile.read_text().splitlines():
            m = re.match(r"COPY\s+(?!--from)(.+)\s+\S+$", line)
            for source in (m.group(1).split() if m else []):
                files = subprocess.run(["git", "ls-files", source], cwd=PACKAGE.parent,
                                       capture_output=True, text=True).stdout.split()
                left_out = [f for f in files if not sent(f)]
                assert files and not left_out, (dockerfile.name, source, left_out[:3])
