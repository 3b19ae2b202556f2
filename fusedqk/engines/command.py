"""Engine files: any engine measured through its command line or its HTTP server, defined by a
YAML file.

An engine file (``config/engines/*.yaml``, docs/engines.md) names two **arms**, the graph path
and the fused path, as environment settings of the same commands (and, with ``toggle``, which
variable is the switch and which of its values mean on and off); a **bench** command template
and how to read decode tok/s (and, where printed, prompt tok/s, peak memory and the number of
tokens decoded) from its output; an **identity** command template (greedy decoding) and how to
find the generated tokens in its output; and where each model's checkpoint is. A server engine
(``kind: server``) gives instead the command that starts its server and how to talk to it
(``fusedqk.engines.server``). Templates are
argument lists: placeholders are replaced inside single arguments and nothing passes through a
shell, so no value can inject a command.

Every key is checked at load against ``fusedqk/data/engine.schema.json`` and then for what a
schema cannot say (regular expressions, placeholders per command, the arms against the toggle),
each problem one line naming the file and the key.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import jsonschema
import regex
import yaml

from fusedqk.engines.process import (
    MAX_OUTPUT_BYTES,
    EngineFailure,
    Finished,
    printable,
    run_bounded,
)
from fusedqk.engines.server import RESERVED_FIELDS, ServerCommand
from fusedqk.errors import UserError, key_path

ARMS = ("graph", "fused")
_MACHINE = {"python": "the Python running fusedqk",
            "llama_cpp": "the folder holding llama.cpp's llama-bench and llama-server "
                         "(FUSEDQK_LLAMA_CPP, else fusedqk's own build: fusedqk.llama_cpp)"}
_COMMON = {**_MACHINE, "model": "the registry name",
           "model_path": "the checkpoint directory", "prompt_tokens": "prompt length",
           "seed": "the run's seed"}
PLACEHOLDERS = {
    "bench": {**_COMMON, "generation_tokens": "tokens to generate",
              "warmup_tokens": "warm-up tokens (bench.warmup x generation_tokens)",
              "prompt": "a seeded prompt of prompt_tokens words"},
    "identity": {**_COMMON, "prompt": "the identity prompt's text",
                 "prompt_seed": "the identity prompt's seed", "max_tokens": "tokens to generate"},
    "version": _MACHINE,
    "server": {**_MACHINE, "model": _COMMON["model"],
               "model_path": _COMMON["model_path"], "seed": _COMMON["seed"],
               "host": "the address it listens on (127.0.0.1)", "port": "a free port"},
}
METRICS = ("decode_tok_s", "prefill_tok_s", "peak_memory_gb", "peak_memory_bytes", "generated_tokens")
_PLACEHOLDER = regex.compile(r"\{(\w+)\}")
TIMEOUT_S = 600
ON, OFF, DEFAULT = "on", "off", "default"
COMMAND, SERVER = "command", "server"


def _schema() -> dict:
    return json.loads(resources.files("fusedqk").joinpath("data/engine.schema.json").read_text())


@dataclass(frozen=True)
class Reader:
    """How to read values from a command's output: regexes with a group ``value`` (the last
    match counts), or fields of the last JSON line that has them. Matching runs under the time
    the run has left, so no pattern can hang a measurement."""

    label: str  # "engine <name>, <key>": names the reader in every failure
    regex: dict[str, regex.Pattern] = field(default_factory=dict)
    json_fields: dict[str, str] = field(default_factory=dict)

    def reads(self, name: str) -> bool:
        return name in self.regex or name in self.json_fields

    def read(self, output: str, names: tuple[str, ...], required: tuple[str, ...],
             timeout_s: float) -> dict:
        found: dict = {}
        for name in names:
            if name in self.regex:
                try:
                    matches = list(self.regex[name].finditer(output, timeout=max(timeout_s, 0.01)))
                except TimeoutError:
                    raise EngineFailure(f"{self.label}.regex.{name}: reading the output took "
                                        "longer than the run's timeout_s") from None
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
            raise EngineFailure(f"{self.label}: the output has no {', '.join(missing)} "
                                f"(last line: {tail!r})")
        return found


def _json_object(line: str) -> dict | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        doc = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


@dataclass(frozen=True)
class Toggle:
    """The engine's switch: the variable, the values it takes as on, as off (None: anything not
    on), and what it does when the variable is unset (``default``: the engine decides)."""

    variable: str
    on: tuple[str, ...]
    off: tuple[str, ...] | None = None
    unset: str = OFF
    case_insensitive: bool = False
    backends: tuple[str, ...] | None = None  # where the engine reads it at all (None: everywhere)

    def meaning(self, env: dict[str, str]) -> str | None:
        """on, off or default for this environment; None where the value means neither."""
        if self.variable not in env:
            return self.unset
        norm = (lambda v: v.lower()) if self.case_insensitive else (lambda v: v)
        value = norm(env[self.variable])
        if value in {norm(v) for v in self.on}:
            return ON
        if self.off is None or value in {norm(v) for v in self.off}:
            return OFF
        return None

    def accepted(self) -> str:
        off = ", ".join(map(repr, self.off)) if self.off else "anything else"
        return f"on: {', '.join(map(repr, self.on))}; off: {off}; unset means {self.unset}"


@dataclass(frozen=True)
class Command:
    argv: list[str]
    timeout_s: float
    reader: Reader


@dataclass(frozen=True)
class IdentityCommand(Command):
    compare: str = "text"  # "tokens" (a list of ids read from a JSON field) or "text"
    generated: regex.Pattern | None = None  # finds the generated text in standard output
    echoes_prompt: bool = False  # the generated text starts with the prompt, dropped before comparing


@dataclass(frozen=True)
class Requirement:
    """A check of the engine binary before anything is measured: ``command``'s output (both
    streams) must match ``pattern``; with ``at_least``, its first group is an integer (a build
    number) no smaller. ``says`` is what a passing binary is, for the one-line refusal."""

    command: list[str]
    pattern: regex.Pattern
    says: str
    at_least: int | None = None
    backends: tuple[str, ...] | None = None  # None: checked on every backend


@dataclass(frozen=True)
class EngineSpec:
    name: str
    source: str
    arms: dict[str, dict[str, str]]  # arm -> environment it sets
    expect: dict[str, regex.Pattern]  # arm -> a line its output must hold (the toggle took effect)
    models: dict[str, str]  # registry name -> checkpoint directory, or "export"
    bench: Command | None = None  # a command engine's
    identity: IdentityCommand | None = None  # a command engine's, unless its server does identity
    server: ServerCommand | None = None  # a server engine's; a command engine's identity server
    kind: str = COMMAND
    toggle: Toggle | None = None
    version_command: list[str] | None = None
    requires: tuple[Requirement, ...] = ()
    derived_from: str = ""
    versions: tuple[str, ...] = ()  # what the file says it was checked against
    max_output_bytes: int = MAX_OUTPUT_BYTES

    @property
    def variable(self) -> str | None:
        """The environment variable that switches the fused path, where the file declares it."""
        return self.toggle.variable if self.toggle else None

    @property
    def identity_by_server(self) -> bool:
        """Identity runs through the engine's server (a server engine, or a command engine whose
        benchmark cannot decode greedily, such as llama-bench)."""
        return self.server is not None

    def arm_env(self, arm: str) -> dict[str, str]:
        """The environment ``arm`` really runs with: this process's, less the toggle variable
        (an arm that leaves it unset gets the engine's own default, never the caller's value),
        then the arm's own."""
        base = {k: v for k, v in os.environ.items() if k != self.variable}
        return {**base, **self.arms[arm]}

    def describe(self, checked: list[str] | None = None) -> dict:
        """What the engine is, for a result's record; ``checked``: what its ``requires`` checks
        matched on this machine."""
        commands: dict = {}
        if self.bench:
            commands["bench"] = self.bench.argv
        if self.identity:
            commands["identity"] = self.identity.argv
        if self.server:
            commands["server"] = self.server.argv
            commands["routes"] = {"health": self.server.health,
                                  "completions": self.server.completions}
        described = {"name": self.name, "kind": self.kind, "file": self.source, "arms": self.arms,
                     "toggle": self.variable, "derived_from": self.derived_from or None,
                     "versions": list(self.versions) or None,
                     "toggle_backends": list(self.toggle.backends)
                     if self.toggle and self.toggle.backends else None,
                     "expect": {arm: p.pattern for arm, p in self.expect.items()}, **commands,
                     "version": self.version(), "requires_matched": checked}
        if any("{llama_cpp}" in arg for argv in commands.values() if isinstance(argv, list)
               for arg in argv):
            from fusedqk import llama_cpp

            described["llama_cpp_build"] = llama_cpp.build_info()
        return described

    def check_requirements(self, backend: str) -> list[str]:
        """Run the file's ``requires`` checks that apply on ``backend``; the first that fails is
        one line naming the engine, the command, what it printed and what is accepted. Returns
        the line each check matched, for the record."""
        matched = []
        for req in self.requires:
            if req.backends is not None and backend not in req.backends:
                continue
            argv = fill_template(req.command, {"python": sys.executable})
            shown = " ".join(Path(argv[0]).name if i == 0 else a for i, a in enumerate(argv))
            try:
                out = run_bounded(argv, dict(os.environ), 60, f"engine {self.name}, `{shown}`",
                                  self.max_output_bytes)
                text = out.stdout + "\n" + out.stderr
            except EngineFailure as e:
                raise UserError(f"{e}; {self.source} needs {req.says}") from None
            found = req.pattern.search(text)
            if found is not None and req.at_least is not None:
                number = found.group(1) if found.groups() else None
                if number is None or not number.isdigit() or int(number) < req.at_least:
                    found = None
            if found is None:
                lines = [line.strip() for line in text.splitlines() if line.strip()]
                said = printable("; ".join(lines[:3]))[:200]
                raise UserError(f"engine {self.name} ({self.source}): `{shown}` printed "
                                f"{said!r}; this file needs {req.says}")
            line_start = text.rfind("\n", 0, found.start()) + 1
            line_end = text.find("\n", found.end())
            matched.append(printable(text[line_start:line_end if line_end >= 0 else None].strip())[:200])
        return matched

    def version(self) -> str | None:
        """What the engine says its version is (``version`` command), or None."""
        if not self.version_command:
            return None
        try:
            out = run_bounded(fill_template(self.version_command, {"python": sys.executable}),
                              dict(os.environ), 60, f"engine {self.name}, version",
                              self.max_output_bytes)
        except UserError:  # a failed run, or an engine folder that cannot be found: no version
            return None
        text = (out.stdout.strip() or out.stderr.strip()).splitlines()
        return text[0][:200] if text else None

    def checkpoint(self, model: str) -> str:
        if model not in self.models:
            raise UserError(f"engine {self.source}: models has no entry for {model!r}; add "
                            f"`{model}: export` or `{model}: <checkpoint directory>`")
        return self.models[model]


def fill_template(template: list[str], values: dict[str, object]) -> list[str]:
    """Fill ``{placeholder}``s argument by argument (never through a shell); ``{llama_cpp}`` is
    looked up (and llama.cpp built, once per machine) only where a command names it."""
    if "llama_cpp" not in values and any("{llama_cpp}" in arg for arg in template):
        from fusedqk import llama_cpp

        values = {**values, "llama_cpp": llama_cpp.bin_dir()}
    def one(arg: str) -> str:
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), arg)
    return [one(a) for a in template]


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (the second would silently win)."""


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                    key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _fail(source: str, key: str, message: str) -> UserError:
    return UserError(f"engine {source}: {key}: {message}")


def _read_doc(path: Path) -> dict:
    source = str(path)
    if not path.is_file():
        raise UserError(f"--engine {source!r}: no such file; give `builtin` or an engine YAML "
                        "file (config/engines/*.yaml)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"engine {source}: not a text file (UTF-8 YAML expected)") from None
    except OSError as e:
        raise UserError(f"engine {source}: cannot be read ({e.strerror})") from None
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader that refuses duplicate keys
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "malformed"
        raise UserError(f"engine {source}: not valid YAML{where} ({problem})") from None
    if not isinstance(doc, dict):
        raise UserError(f"engine {source}: expected a mapping with name, arms, bench, identity, models")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(_schema()).iter_errors(doc))
    if error is not None:
        raise _fail(source, key_path(error.absolute_path) or "file",
                    _schema_message(error))
    return doc


def _schema_message(error: jsonschema.ValidationError) -> str:
    """jsonschema's complaint in a user's words: unknown keys with the accepted ones, and what
    the key holds (the schema's description) where it has one."""
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = error.schema.get("properties", {})
        extra = sorted(str(k) for k in error.instance if k not in known)
        return (f"unknown key {', '.join(map(repr, extra))}; accepted: "
                f"{', '.join(sorted(known))}")
    message = error.message if len(error.message) <= 160 else error.message[:157] + "..."
    hint = error.schema.get("description") if isinstance(error.schema, dict) else None
    return f"{message}; {hint}" if hint else message


def _pattern(source: str, key: str, text: str, group: bool = True) -> regex.Pattern:
    try:
        compiled = regex.compile(text, regex.MULTILINE)
    except regex.error as e:
        raise _fail(source, key, f"not a regular expression ({e})") from None
    if group and "value" not in compiled.groupindex:
        raise _fail(source, key, "needs a named group (?P<value>...)")
    return compiled


def _argv(source: str, key: str, value: list, allowed: dict[str, str]) -> list[str]:
    argv = [str(v) for v in value]
    for arg in argv:
        if "\0" in arg:
            raise _fail(source, key, "an argument holds a NUL byte")
        for name in _PLACEHOLDER.findall(arg):
            if name not in allowed:
                raise _fail(source, key, f"placeholder {{{name}}} is not one of this command's; "
                            "accepted: " + ", ".join("{" + p + "}" for p in allowed))
        # A brace left over once the placeholders are taken out is a malformed one ({model,
        # {model!r}, { model }): it would pass to the engine literally.
        rest = _PLACEHOLDER.sub("", arg)
        if "{" in rest or "}" in rest:
            raise _fail(source, key, f"{arg[:60]!r} has a brace that is no placeholder; write "
                        "placeholders as {name} (accepted: "
                        + ", ".join("{" + p + "}" for p in allowed) + ")")
    return argv


def _reader(source: str, key: str, doc: dict, name: str) -> Reader:
    regexes = {k: _pattern(source, f"{key}.regex.{k}", v) for k, v in (doc.get("regex") or {}).items()}
    both = set(regexes) & set(doc.get("json") or {})
    if both:
        raise _fail(source, key, f"{', '.join(sorted(both))} read both by regex and json: give one")
    return Reader(f"engine {name}, {key}", regexes, dict(doc.get("json") or {}))


def _env(source: str, key: str, env: dict) -> dict[str, str]:
    out = {}
    for k, v in env.items():
        if isinstance(v, bool):
            raise _fail(source, f"{key}.{k}", "quote the value (a YAML true/false is not a value)")
        if "\0" in str(v):
            raise _fail(source, f"{key}.{k}", "the value holds a NUL byte")
        out[str(k)] = str(v)
    return out


def _toggle(doc: dict | None) -> Toggle | None:
    if doc is None:
        return None
    return Toggle(doc["variable"], tuple(doc["on_values"]),
                  tuple(doc["off_values"]) if "off_values" in doc else None,
                  doc.get("unset", OFF), doc.get("case_insensitive", False),
                  tuple(doc["backends"]) if "backends" in doc else None)


def _check_arms(source: str, envs: dict[str, dict[str, str]], toggle: Toggle | None) -> None:
    if toggle is None:
        if envs["graph"] == envs["fused"]:
            raise _fail(source, "arms", "the graph and fused arms set the same environment, so they "
                        "run the same command: nothing would be compared (make the toggle differ)")
        return
    wanted = {"graph": OFF, "fused": ON}
    for arm in ARMS:
        meaning = toggle.meaning(envs[arm])
        if meaning != wanted[arm]:
            shown = envs[arm].get(toggle.variable)
            value = "unset" if shown is None else repr(shown)
            says = "means neither" if meaning is None else f"means {meaning}"
            raise _fail(source, f"arms.{arm}.env.{toggle.variable}",
                        f"{value} {says} to the engine, and the {arm} arm must be {wanted[arm]} "
                        f"({toggle.accepted()})")


def load_engine(path: str | Path) -> EngineSpec:
    """Read and check an engine file; every problem is one line naming the file and the key."""
    if not str(path).strip():  # Path("") would read as "."
        raise UserError(f"--engine {str(path)!r} is empty; give `builtin` or an engine YAML file "
                        "(config/engines/*.yaml)")
    path = Path(path)
    source = str(path)
    doc = _read_doc(path)
    name = doc["name"]
    toggle = _toggle(doc.get("toggle"))
    envs = {arm: _env(source, f"arms.{arm}.env", (doc["arms"][arm] or {}).get("env", {}))
            for arm in ARMS}
    _check_arms(source, envs, toggle)
    expect = {arm: _pattern(source, f"arms.{arm}.expect", doc["arms"][arm]["expect"], group=False)
              for arm in ARMS if doc["arms"][arm].get("expect")}
    kind = doc.get("kind", COMMAND)
    # A command engine checks identity with its identity command, or through its own server
    # (``server`` instead of ``identity``: llama-bench decodes no text it could compare).
    wanted = ("server",) if kind == SERVER else \
        ("bench", "identity" if "server" not in doc else "server")
    unwanted = ("bench", "identity") if kind == SERVER else \
        (("identity",) if "server" in doc else ())
    for key in wanted:
        if key not in doc:
            raise _fail(source, key, f"required for kind {kind}"
                        + ("" if kind == SERVER else " (or a server for identity)"))
    for key in unwanted:
        if key in doc:
            raise _fail(source, key, f"not a key of kind {kind}" + (
                " (kind: command has it)" if kind == SERVER else
                " beside server: identity runs through the server"))
    if kind == SERVER:
        commands = {"server": _server(source, doc["server"])}
    else:
        commands = _commands(source, name, doc["bench"], doc.get("identity"))
        if "server" in doc:
            commands["server"] = _server(source, doc["server"])
    return EngineSpec(
        name=name, source=source, arms=envs, expect=expect, toggle=toggle, kind=kind,
        models=dict(doc["models"]), **commands,
        version_command=(_argv(source, "version", doc["version"], PLACEHOLDERS["version"])
                         if doc.get("version") else None),
        requires=tuple(_requirement(source, f"requires[{i}]", r)
                       for i, r in enumerate(doc.get("requires") or ())),
        derived_from=doc.get("source", ""), versions=tuple(doc.get("versions") or ()),
        max_output_bytes=doc.get("max_output_bytes", MAX_OUTPUT_BYTES))


def _requirement(source: str, key: str, doc: dict) -> Requirement:
    pattern = _pattern(source, f"{key}.pattern", doc["pattern"], group=False)
    if "at_least" in doc and pattern.groups < 1:
        raise _fail(source, f"{key}.pattern", "needs a group holding the number at_least is "
                    "compared with")
    return Requirement(_argv(source, f"{key}.command", doc["command"], PLACEHOLDERS["version"]),
                       pattern, doc["says"], doc.get("at_least"),
                       tuple(doc["backends"]) if "backends" in doc else None)


def _commands(source: str, name: str, bench: dict, ident: dict | None) -> dict:
    """A command engine's bench command, and its identity command where it has one."""
    bench_reader = _reader(source, "bench", bench, name)
    if not bench_reader.reads("decode_tok_s"):
        raise _fail(source, "bench", "say how to read decode_tok_s (regex or json)")
    commands = {"bench": Command(_argv(source, "bench.command", bench["command"],
                                       PLACEHOLDERS["bench"]),
                                 float(bench.get("timeout_s", TIMEOUT_S)), bench_reader)}
    if ident is None:
        return commands
    compare = ident.get("compare", "text")
    ident_reader = _reader(source, "identity", ident, name)
    if compare == "tokens" and "tokens" not in ident_reader.json_fields:
        raise _fail(source, "identity", "compare: tokens needs json: {tokens: <field>}")
    if compare == "text" and "generated" not in ident:
        raise _fail(source, "identity.generated", "compare: text needs a regular expression whose "
                    "group (?P<value>...) is the generated text alone (banners and timing lines "
                    "are not the engine's output)")
    generated = (_pattern(source, "identity.generated", ident["generated"])
                 if "generated" in ident else None)
    commands["identity"] = IdentityCommand(
        _argv(source, "identity.command", ident["command"], PLACEHOLDERS["identity"]),
        float(ident.get("timeout_s", TIMEOUT_S)), ident_reader, compare, generated,
        bool(ident.get("echoes_prompt", False)))
    return commands


def _server(source: str, doc: dict) -> ServerCommand:
    """A server engine's command and routes."""
    argv = _argv(source, "server.command", doc["command"], PLACEHOLDERS["server"])
    if not any("{port}" in a for a in argv):
        raise _fail(source, "server.command", "needs {port}: fusedqk picks a free port per arm")
    for key in ("request", "identity_request"):
        taken = sorted(set(doc.get(key) or {}) & set(RESERVED_FIELDS))
        if taken:
            raise _fail(source, f"server.{key}", f"{', '.join(taken)} are set by fusedqk; accepted: "
                        f"any other request field (fusedqk sets {', '.join(RESERVED_FIELDS)})")
    if "cpus_per_arm" in doc and "shared_cpus" in doc:
        raise _fail(source, "server.shared_cpus", "and server.cpus_per_arm are two placements; "
                    "accepted: one of them, or neither (unpinned)")
    for key in ("startup_timeout_s", "request_timeout_s"):
        if key in doc and not math.isfinite(float(doc[key])):
            raise _fail(source, f"server.{key}", f"{doc[key]!r} is not a number of seconds; give "
                        "a finite positive number")
    return ServerCommand(
        argv, doc.get("health", "/health"), doc.get("completions", "/v1/completions"),
        float(doc.get("startup_timeout_s", 900)), float(doc.get("request_timeout_s", TIMEOUT_S)),
        dict(doc.get("request") or {}), dict(doc.get("identity_request") or {}),
        doc.get("identity_tokens"), doc.get("timing_field"), doc.get("cpus_per_arm"),
        doc.get("shared_cpus"), bool(doc.get("prompt_ids", False)), doc.get("identity_route"))


def run_arm(spec: EngineSpec, command: Command, arm: str, values: dict[str, object]) -> Finished:
    """One fresh process of ``command`` for ``arm``, bounded (``engines.process``); a missing
    binary, a non-zero exit, a hang, an output flood or a missing ``expect`` line is an
    ``EngineFailure`` naming the engine, the command and the arm."""
    key = "bench" if command is spec.bench else "identity"
    argv = fill_template(command.argv, {"python": sys.executable, **values})
    out = run_bounded(argv, spec.arm_env(arm), command.timeout_s,
                      f"engine {spec.name}, {key}, {arm} arm", spec.max_output_bytes)
    if arm in spec.expect:
        try:
            seen = spec.expect[arm].search(out.output, timeout=max(out.time_left(), 0.01))
        except TimeoutError:
            raise EngineFailure(f"engine {spec.name}, arms.{arm}.expect: matching took longer than "
                                "the run's timeout_s") from None
        if not seen:
            raise EngineFailure(f"engine {spec.name}, {key}, {arm} arm: its output lacks "
                                f"{spec.expect[arm].pattern!r} (arms.{arm}.expect): the toggle did "
                                "not take effect, so the arms may not differ")
    return out
