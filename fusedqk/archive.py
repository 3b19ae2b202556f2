"""A run directory: its layout, loading it back, tidy tables across models, and its manifest.

    <run>/config.yaml                      the pipeline configuration used
    <run>/environment.json                 where it ran (fusedqk env --json)
    <run>/<model>/bench/{trials,tokens}.csv, bench.json
    <run>/<model>/identity-<impl>.json
    <run>/<model>/blockbench/blockbench.{csv,json}
    <run>/<model>/status-<job>.json        how each job ended ({"ok": false, "error": ...})
    <run>/trials.csv, summaries.csv        aggregate: every trial / every summary of the run
    <run>/decisions.json                   fusedqk decide
    <run>/report.md, report.html           fusedqk report
    <run>/MANIFEST.sha256                  sha256 of every other file
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd
import yaml

from fusedqk import formats
from fusedqk.atomic import write_text
from fusedqk.errors import UserError, first_line
from fusedqk.registry import size_order

MANIFEST = "MANIFEST.sha256"


@dataclass
class ModelResults:
    name: str
    bench: dict | None = None
    trials: pd.DataFrame | None = None
    tokens: pd.DataFrame | None = None
    identity: dict[str, dict] = field(default_factory=dict)  # impl -> identity result
    blockbench: dict | None = None
    failed: str | None = None
    seconds: dict[str, dict] = field(default_factory=dict)  # job -> where its time went


@dataclass
class RunData:
    path: Path
    environment: dict
    config: str
    models: dict[str, ModelResults]
    planned: dict = field(default_factory=dict)  # the configuration's settings of this backend

    @property
    def backend(self) -> str:
        return self.environment.get("backend", "unknown")


read_json = formats.load  # every reader goes through the one format's load


def read_table(path: Path) -> pd.DataFrame:
    """A result table; a missing, empty or cut-short file is one line naming it."""
    if not path.is_file():
        raise UserError(f"{path}: missing; the bench job writes it with trials.csv: rerun it")
    raw = path.read_bytes()
    # Every writer ends its last row with a newline: a file that does not was cut mid-row.
    if raw and not raw.endswith(b"\n"):
        raise UserError(f"{path}: its last row is cut short: rerun the job that writes it")
    try:
        table = pd.read_csv(io.BytesIO(raw))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable table ({first_line(e)})") from None
    if table.isna().all(axis=1).any():
        raise UserError(f"{path}: a row has only empty fields: rerun the job that writes it")
    return table


def _check_speedups(bench: dict, source: Path) -> None:
    for s in bench.get("speedups", []):
        try:
            ordered = s["lo"] <= s["point"] <= s["hi"]
        except (KeyError, TypeError):
            ordered = False
        if not ordered:
            raise UserError(f"{source}: speedup of {s.get('path')!r} is not a point inside its "
                            f"interval (lo <= point <= hi): the file was edited or damaged")


def load_run(run_dir: Path) -> RunData:
    """Everything a run directory holds, for decide and report (nothing is recomputed)."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    models = {}
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        m = ModelResults(d.name)
        m.bench = read_json(d / "bench" / "bench.json", "bench")
        if m.bench:
            _check_speedups(m.bench, d / "bench" / "bench.json")
        if (d / "bench" / "trials.csv").is_file():
            m.trials = read_table(d / "bench" / "trials.csv")
            m.tokens = read_table(d / "bench" / "tokens.csv")
        for f in sorted(d.glob("identity-*.json")):
            m.identity[f.stem.removeprefix("identity-")] = read_json(f, "identity")
        m.blockbench = read_json(d / "blockbench" / "blockbench.json", "blockbench")
        statuses = {st.stem.removeprefix("status-"): read_json(st, "status")
                    for st in sorted(d.glob("status-*.json"))}
        errors = [f"{job}: {doc['error']}" for job, doc in statuses.items() if not doc["ok"]]
        m.seconds = {job: doc["seconds"] for job, doc in statuses.items() if doc.get("seconds")}
        if errors:
            m.failed = "; ".join(errors)
        if m.bench or m.identity or m.blockbench or m.failed:
            models[d.name] = m
    if not models:
        raise UserError(f"{run_dir}: holds no model results (expected <model>/bench/bench.json)")
    env = read_json(run_dir / "environment.json", "environment") or {}
    if not env:
        env = next((m.bench["meta"]["environment"] for m in models.values() if m.bench), {})
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    # A model the configuration asked for that left nothing is a result too: say so.
    planned = (yaml.safe_load(config) or {}).get("backend_settings", {}).get(env.get("backend"), {})
    for name in planned.get("models", []):
        models.setdefault(name, ModelResults(name, failed="no results in this run"))
    # Smallest model first, in every table and plot made from a run.
    ordered = {name: models[name] for name in sorted(models, key=size_order)}
    return RunData(run_dir, env, config, ordered, planned)


def aggregate(run_dir: Path) -> None:
    """trials.csv and summaries.csv: one tidy table each for the whole run."""
    run = load_run(run_dir)
    trials = [m.trials for m in run.models.values() if m.trials is not None]
    rows = []
    for m in run.models.values():
        if not m.bench:
            continue
        speed = {s["path"]: s for s in m.bench["speedups"]}
        for s in m.bench["summary"]:
            sp = speed.get(s["path"], {})
            rows.append({**s, "speedup": sp.get("point"), "speedup_lo": sp.get("lo"),
                         "speedup_hi": sp.get("hi"), "p_value": sp.get("p_value"),
                         "identity": (m.identity.get(s["path"]) or {}).get("verdict")})
    write_text(run_dir / "trials.csv",
               pd.concat(trials).to_csv(index=False) if trials else "")
    write_text(run_dir / "summaries.csv", pd.DataFrame(rows).to_csv(index=False))


def _tree(run_dir: Path) -> tuple[list[Path], list[str]]:
    """Every regular file of a run but the manifest itself (dotfiles included), and a problem
    for every entry that is not a regular file or a real directory: a symlink (to anything,
    dangling or not), a FIFO, a socket, a device. Nothing is followed outside the run."""
    files, problems = [], []

    def unreadable(e: OSError) -> None:  # a folder os.walk cannot list must not pass unseen
        rel = Path(e.filename).relative_to(run_dir).as_posix() if e.filename else "?"
        problems.append(f"a folder that cannot be read ({e.strerror}): {_short(rel)}")

    for top, dirs, names in os.walk(run_dir, followlinks=False, onerror=unreadable):
        for name in sorted(dirs + names):
            path = Path(top) / name
            rel = path.relative_to(run_dir).as_posix()
            try:
                mode = path.lstat().st_mode
            except OSError as e:  # a name past PATH_MAX, or gone meanwhile
                problems.append(f"an entry that cannot be read ({e.strerror}): {_short(rel)}")
                if name in dirs:
                    dirs.remove(name)
                continue
            if stat.S_ISLNK(mode):
                problems.append(f"not a regular file (a symlink): {rel}")
            elif stat.S_ISREG(mode):
                if rel != MANIFEST:
                    files.append(path)
            elif not stat.S_ISDIR(mode):
                problems.append(f"not a regular file: {rel}")
        dirs[:] = [d for d in dirs if not (Path(top) / d).is_symlink()]
    return sorted(files), problems


def _short(rel: str) -> str:
    return rel if len(rel) <= 120 else f"{rel[:60]}…{rel[-40:]} ({len(rel)} characters)"


def _files(run_dir: Path) -> list[Path]:
    """Every regular file of a run but the manifest; a run holding anything else is refused."""
    files, problems = _tree(run_dir)
    if problems:
        raise UserError(f"{run_dir}: {problems[0]}; a run holds only regular files and folders")
    return files


def _listed_name(name: str) -> str | None:
    """Why a manifest entry's name is not a normalised relative path inside the run, or None."""
    if not name or "\0" in name or "\\" in name:
        return "not a path"
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        return "outside the run (an absolute path)"
    parts = name.split("/")
    if ".." in parts:
        return "outside the run (a .. component)"
    if any(p in ("", ".") for p in parts):
        return "not a normalised path"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(run_dir: Path) -> int:
    files = _files(run_dir)
    names = [p.relative_to(run_dir).as_posix() for p in files]
    for name in names:
        # A name the manifest cannot hold as UTF-8 text on one line would seal a run that
        # never verifies.
        if "\n" in name or "\r" in name or not _encodes(name):
            raise UserError(f"{run_dir}: the file name {name!r} cannot be listed in {MANIFEST} "
                            "(not UTF-8, or a line break); rename it")
    if (run_dir / MANIFEST).exists() and not (run_dir / MANIFEST).is_file():
        raise UserError(f"{run_dir}: {MANIFEST} is not a file (a folder or a link is there); "
                        "move it away first")
    lines = [f"{_sha256(p)}  {name}" for p, name in zip(files, names, strict=True)]
    write_text(run_dir / MANIFEST, "\n".join(lines) + "\n")
    return len(files)


def _encodes(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a surrogate escape: bytes that are not UTF-8
        return False
    return True


def verify(run_dir: Path) -> list[str]:
    """Problems with a sealed run: manifest entries that are not normalised paths inside the
    run, missing, changed or unlisted files, and anything that is not a regular file (empty when
    all is well). ``verify``, ``report --from`` and ``compare`` all read runs through this."""
    manifest = run_dir / MANIFEST
    if manifest.is_symlink() or not manifest.is_file():
        raise UserError(f"{run_dir}: no {MANIFEST} (write one with `fusedqk verify --write DIR`)")
    try:
        text = manifest.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return [f"{MANIFEST}: not UTF-8 text"]
    files, problems = _tree(run_dir)
    listed = {}
    for number, line in enumerate(text.splitlines(), 1):
        digest, sep, name = line.partition("  ")
        why = _listed_name(name) if sep and len(digest) == 64 and all(
            c in "0123456789abcdef" for c in digest) else "not a '<sha256>  <path>' line"
        if not why and name in listed:
            why = "lists a file twice (a second digest would let a changed file pass)"
        if why:
            problems.append(f"{MANIFEST} line {number}: {why}: {line[:80]!r}")
            continue
        listed[name] = digest
    present = {p.relative_to(run_dir).as_posix(): p for p in files}
    for name, digest in listed.items():
        if name not in present:
            problems.append(f"missing: {name}")
        elif _sha256(present[name]) != digest:
            problems.append(f"changed: {name}")
    problems += [f"not in manifest: {name}" for name in present if name not in listed]
    return problems


def sealed_run_of(path: Path) -> Path | None:
    """The sealed run ``path`` is, or lies inside (the nearest folder with a manifest), or None."""
    for folder in [path, *path.parents] if path.is_dir() else list(path.parents):
        if (folder / MANIFEST).is_file():
            return folder
    return None


def refuse_sealed(path: Path, flag: str, rewrite: bool = False) -> None:
    """Writing ``path`` must not change a sealed run behind its manifest: refused unless
    ``rewrite``, which unseals the run (its manifest goes; the pipeline or ``verify --write``
    seals it again)."""
    run = sealed_run_of(path.resolve())
    if run is None:
        return
    if not rewrite:
        raise UserError(f"{flag} {str(path)!r}: inside the sealed run {str(run)!r} ({MANIFEST}); "
                        "give --rewrite to redo it (then seal it again with `fusedqk verify --write`)")
    (run / MANIFEST).unlink()
