"""Command engines: any engine measured through its command line, defined by a YAML file.

An engine file (``config/engines/*.yaml``, docs/engines.md) names two **arms**, the graph path
and the fused path, as environment settings of the same commands; a **bench** command template
and how to read decode tok/s (and, where printed, prompt tok/s and peak memory) from its
output; an **identity** command template (greedy decoding) and what to compare from its output;
and where each model's checkpoint is. Templates are argument lists: placeholders are replaced
inside single arguments and nothing passes through a shell, so no value can inject a command.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fusedqk.errors import UserError

ARMS = ("graph", "fused")
PLACEHOLDERS = {
    "python": "the Python running fusedqk", "model": "the registry name",
    "model_path": "the checkpoint directory", "prompt_tokens": "prompt length",
    "generation_tokens": "tokens to generate (bench)", "warmup_tokens": "warm-up tokens (bench)",
    "seed": "the run's seed", "prompt": "the identity prompt's text",
    "prompt_seed": "the identity prompt's seed", "max_tokens": "tokens to generate (identity)",
}
METRICS = ("decode_tok_s", "prefill_tok_s", "peak_memory_gb", "peak_memory_bytes")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
TIMEOUT_S = 600


class EngineFailure(Exception):
    """One run of an engine's command failed: the message is the one line the report shows."""


@dataclass(frozen=True)
class Reader:
    """How to read values from a command's output: regexes with a group ``value`` (the last
    match counts), or fields of the last JSON line that has them."""

    regex: dict[str, re.Pattern] = field(default_factory=dict)
    json_fields: dict[str, str] = field(default_factory=dict)

    def read(self, output: str, names: tuple[str, ...], required: tuple[str, ...]) -> dict:
        found: dict = {}
        for name in names:
            if name in self.regex:
                matches = list(self.regex[name].finditer(output))
                if matches:
                    found[name] = matches[-1].group("value")
            elif name in self.json_fields:
                for line in reversed(output.splitlines()):
                    doc = _json_object(line)
                    if doc is not None and self.json_fields[name] in doc:
                        found[name] = doc[self.json_fields[name]]
                        break
        missing = [n for n in required if n not in found]
        if missing:
            tail = (output.strip().splitlines() or ["no output"])[-1][:160]
            raise EngineFailure(f"output has no {', '.join(missing)} (last line: {tail!r})")
        return found


def _json_object(line: str) -> dict | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        doc = json.loads(line)
    except json.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


@dataclass(frozen=True)
class Command:
    argv: list[str]
    timeout_s: float
    reader: Reader


@dataclass(frozen=True)
class IdentityCommand(Command):
    compare: str = "text"  # "tokens" (a list of ids read from a JSON field) or "text"
    strip: tuple[re.Pattern, ...] = ()  # lines dropped from the text before comparing


@dataclass(frozen=True)
class EngineSpec:
    name: str
    source: str
    arms: dict[str, dict[str, str]]  # arm -> environment it sets
    expect: dict[str, re.Pattern]  # arm -> a line its output must hold (the toggle took effect)
    bench: Command
    identity: IdentityCommand
    models: dict[str, str]  # registry name -> checkpoint directory, or "export"
    version_command: list[str] | None = None

    def describe(self) -> dict:
        return {"name": self.name, "file": self.source, "arms": self.arms,
                "expect": {arm: p.pattern for arm, p in self.expect.items()},
                "bench": self.bench.argv, "identity": self.identity.argv,
                "version": self.version()}

    def version(self) -> str | None:
        """What the engine says its version is (``version`` command), or None."""
        if not self.version_command:
            return None
        try:
            out = subprocess.run(render(self.version_command, {"python": sys.executable}),
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        text = (out.stdout.strip() or out.stderr.strip()).splitlines()
        return text[0][:200] if out.returncode == 0 and text else None

    def checkpoint(self, model: str) -> str:
        if model not in self.models:
            raise UserError(f"engine {self.source}: models has no entry for {model!r}; add "
                            f"`{model}: export` or `{model}: <checkpoint directory>`")
        return self.models[model]


def render(template: list[str], values: dict[str, object]) -> list[str]:
    """Fill ``{placeholder}``s argument by argument (never through a shell)."""
    def one(arg: str) -> str:
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), arg)
    return [one(a) for a in template]


def _fail(source: str, key: str, message: str) -> UserError:
    return UserError(f"engine {source}: {key}: {message}")


def _str_list(source: str, key: str, value: object) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str | int) for v in value):
        raise _fail(source, key, "give the command as a non-empty list of arguments")
    argv = [str(v) for v in value]
    for arg in argv:
        for name in _PLACEHOLDER.findall(arg):
            if name not in PLACEHOLDERS:
                raise _fail(source, key, f"placeholder {{{name}}} is unknown; accepted: "
                            + ", ".join("{" + p + "}" for p in PLACEHOLDERS))
    return argv


def _reader(source: str, key: str, doc: dict, names: tuple[str, ...]) -> Reader:
    regex, fields = {}, {}
    for name, pattern in (doc.get("regex") or {}).items():
        if name not in names:
            raise _fail(source, f"{key}.regex.{name}", f"not a value it reads; accepted: {', '.join(names)}")
        try:
            compiled = re.compile(pattern, re.MULTILINE)
        except (re.error, TypeError) as e:
            raise _fail(source, f"{key}.regex.{name}", f"not a regular expression ({e})") from None
        if "value" not in compiled.groupindex:
            raise _fail(source, f"{key}.regex.{name}", "needs a named group (?P<value>...)")
        regex[name] = compiled
    for name, json_field in (doc.get("json") or {}).items():
        if name not in names or not isinstance(json_field, str):
            raise _fail(source, f"{key}.json.{name}", f"map one of {', '.join(names)} to a field name")
        fields[name] = json_field
    return Reader(regex, fields)


def _timeout(source: str, key: str, doc: dict) -> float:
    value = doc.get("timeout_s", TIMEOUT_S)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 1 <= value <= 86400:
        raise _fail(source, f"{key}.timeout_s", "give seconds from 1 to 86400")
    return float(value)


def load_engine(path: str | Path) -> EngineSpec:
    """Read and check an engine file; every problem is one line naming the key."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise UserError(f"--engine {source!r}: no such file; give `builtin` or an engine YAML "
                        "file (config/engines/*.yaml)")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"engine {source}: not valid YAML{where}") from None
    if not isinstance(doc, dict):
        raise UserError(f"engine {source}: expected a mapping with name, arms, bench, identity, models")
    known = {"name", "arms", "bench", "identity", "models", "version", "about"}
    for key in doc:
        if key not in known:
            raise _fail(source, str(key), f"unknown key; accepted: {', '.join(sorted(known))}")
    for key in ("name", "arms", "bench", "identity", "models"):
        if key not in doc:
            raise _fail(source, key, "missing")
    arms = doc["arms"]
    if not isinstance(arms, dict) or set(arms) != set(ARMS):
        raise _fail(source, "arms", "give exactly two arms, graph and fused, each {env: {VAR: value}}")
    envs, expect = {}, {}
    for arm in ARMS:
        if isinstance(arms[arm], dict) and arms[arm].get("expect") is not None:
            try:
                expect[arm] = re.compile(str(arms[arm]["expect"]), re.MULTILINE)
            except re.error as e:
                raise _fail(source, f"arms.{arm}.expect", f"not a regular expression ({e})") from None
        env = (arms[arm] or {}).get("env", {}) if isinstance(arms[arm], dict) else None
        if not isinstance(env, dict) or not all(isinstance(v, str | int | float) and not isinstance(v, bool)
                                                for v in env.values()):
            raise _fail(source, f"arms.{arm}.env", "give a mapping of variable -> value (quote values)")
        envs[arm] = {str(k): str(v) for k, v in env.items()}
    if envs["graph"] == envs["fused"]:
        raise _fail(source, "arms", "the graph and fused arms set the same environment, so they run "
                    "the same command: nothing would be compared (make the toggle differ)")
    bench, ident = doc["bench"], doc["identity"]
    if not isinstance(bench, dict) or not isinstance(ident, dict):
        raise _fail(source, "bench/identity", "each is a mapping with a command")
    bench_reader = _reader(source, "bench", bench, METRICS)
    if "decode_tok_s" not in {**bench_reader.regex, **bench_reader.json_fields}:
        raise _fail(source, "bench", "say how to read decode_tok_s (regex or json)")
    compare = ident.get("compare", "text")
    if compare not in ("text", "tokens"):
        raise _fail(source, "identity.compare", "accepted: text, tokens")
    ident_reader = _reader(source, "identity", ident, ("tokens",))
    if compare == "tokens" and "tokens" not in ident_reader.json_fields:
        raise _fail(source, "identity", "compare: tokens needs json: {tokens: <field>}")
    strip = []
    for i, pattern in enumerate(ident.get("strip", []) or []):
        try:
            strip.append(re.compile(pattern))
        except (re.error, TypeError) as e:
            raise _fail(source, f"identity.strip[{i}]", f"not a regular expression ({e})") from None
    models = doc["models"]
    if not isinstance(models, dict) or not models:
        raise _fail(source, "models", "give registry model -> `export` or a checkpoint directory")
    version = doc.get("version")
    return EngineSpec(
        name=str(doc["name"]), source=source, arms=envs, expect=expect,
        bench=Command(_str_list(source, "bench.command", bench.get("command")),
                      _timeout(source, "bench", bench), bench_reader),
        identity=IdentityCommand(_str_list(source, "identity.command", ident.get("command")),
                                 _timeout(source, "identity", ident), ident_reader, compare,
                                 tuple(strip)),
        models={str(k): str(v) for k, v in models.items()},
        version_command=_str_list(source, "version", version) if version else None)


@dataclass
class Outcome:
    stdout: str
    stderr: str
    wall_s: float

    @property
    def output(self) -> str:
        """Both streams: where a bench's figures are read (engines print them on either)."""
        return self.stdout + "\n" + self.stderr


def run_arm(spec: EngineSpec, command: Command, arm: str, values: dict[str, object]) -> Outcome:
    """One fresh process of ``command`` for ``arm``; a missing binary, a non-zero exit or a hang
    is an ``EngineFailure`` naming it."""
    argv = render(command.argv, {"python": sys.executable, **values})
    env = {**os.environ, **spec.arms[arm]}
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=command.timeout_s,
                              env=env, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise EngineFailure(f"{arm} arm: command {argv[0]!r} not found") from None
    except subprocess.TimeoutExpired:
        raise EngineFailure(f"{arm} arm: {argv[0]} did not finish in {command.timeout_s:g} s "
                            "(timeout_s)") from None
    except OSError as e:
        raise EngineFailure(f"{arm} arm: {argv[0]} could not start ({e.strerror})") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1][:200]
        raise EngineFailure(f"{arm} arm: {argv[0]} exited with status {proc.returncode}: {last}")
    out = Outcome(proc.stdout, proc.stderr, time.perf_counter() - start)
    if arm in spec.expect and not spec.expect[arm].search(out.output):
        raise EngineFailure(f"{arm} arm: its output lacks {spec.expect[arm].pattern!r} (arms.{arm}."
                            "expect): the toggle did not take effect, so the arms may not differ")
    return out
