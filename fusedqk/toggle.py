"""The fused-path toggle: environment variables, the per-backend defaults table, and resolution.

Every variable read here is documented in docs/configuration.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from fusedqk.errors import UserError, shown

ENV_TOGGLE = "FUSEDQK_FUSED_QK_NORM"
ENV_IMPL = "FUSEDQK_FUSED_IMPL"
ENV_DEFAULTS = "FUSEDQK_DEFAULTS"
ENV_KERNEL_CALL = "FUSEDQK_KERNEL_CALL"

TRUE_WORDS = ("1", "true", "on", "yes")
FALSE_WORDS = ("0", "false", "off", "no")
IMPLS = ("auto", "kernel", "composite", "kernel_kv")
# How the CUDA kernel is called: the C++ primitive where it is built (auto), or mx.fast.cuda_kernel.
KERNEL_CALLS = ("auto", "primitive", "cuda_kernel")
# One vocabulary for every command, config key and file: the graph path, the two fused
# implementations, and ``fused`` = the implementation this backend resolves to.
PATH_NAMES = ("graph", "fused", "composite", "kernel", "kernel_kv")
KERNEL_PATHS = ("kernel", "kernel_kv")  # the paths that need a backend with a kernel
DEFAULTS_SCHEMA = "fusedqk-defaults/1"
SHIPPED = "fusedqk/data/defaults.json"


def parse_toggle(value: str, name: str = ENV_TOGGLE) -> bool:
    """``1/true/on/yes`` → True, ``0/false/off/no`` → False (trimmed, any case); else an error."""
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise UserError(f"{name}={shown(value)} is not accepted; use one of {'/'.join(TRUE_WORDS)} to enable "
                    f"or {'/'.join(FALSE_WORDS)} to disable, or leave it unset for the default")


def parse_impl(value: str, name: str = ENV_IMPL) -> str:
    word = value.strip().lower()
    if word not in IMPLS:
        raise UserError(f"{name}={shown(value)} is not accepted; use one of {', '.join(IMPLS)}")
    return word


def kernel_call(backend: str, env: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """How the kernel is called on ``backend``, and why. On cuda: ``primitive`` (the C++
    extension, where it is built and loads) or ``cuda_kernel`` (``mx.fast.cuda_kernel``), from
    FUSEDQK_KERNEL_CALL; ``metal_kernel`` on metal; None where no kernel exists. The kernel is
    told this; it never reads the environment."""
    if backend == "metal":
        return "metal_kernel", "the Metal kernel has one call"
    if backend != "cuda":
        return None, f"no kernel for {backend}"
    env = os.environ if env is None else env
    wanted = parse_kernel_call(env.get(ENV_KERNEL_CALL, "auto"))
    if wanted == "cuda_kernel":
        return "cuda_kernel", f"{ENV_KERNEL_CALL}=cuda_kernel"
    from fusedqk.kernels import cuda_ext

    module, why = cuda_ext.load()
    if module is not None:
        return "primitive", f"the C++ extension loads ({why})"
    if wanted == "primitive":
        raise UserError(f"{ENV_KERNEL_CALL}=primitive: the extension is unavailable: {why}")
    return "cuda_kernel", f"the C++ extension is unavailable: {why}"


def parse_kernel_call(value: str, name: str = ENV_KERNEL_CALL) -> str:
    word = value.strip().lower()
    if word not in KERNEL_CALLS:
        raise UserError(f"{name}={shown(value)} is not accepted; use one of {', '.join(KERNEL_CALLS)}")
    return word


@dataclass(frozen=True)
class BackendDefault:
    fused_qk_norm: bool
    impl: str
    reason: str
    evidence: str
    # card (as the driver names it) -> what was measured on it: {"verdict": ..., "runs": [...]}
    cards: dict[str, dict] = field(default_factory=dict)
    summary: str = ""  # the reason in one line, for `fusedqk env` (the full text is ``reason``)

    def card_evidence(self, card: str | None) -> str:
        """What the table holds for ``card``, or that the card was never measured."""
        entry = self.cards.get(card or "")
        if entry:
            return f"{card}: {entry.get('verdict', '')} [{', '.join(entry.get('runs', []))}]"
        measured = ", ".join(self.cards) or "none recorded"
        return f"{card or 'this device'} has never been measured; the default rests on: {measured}"

    def card_summary(self, card: str | None) -> tuple[str, str | None]:
        """(one line on what was measured on ``card``, its newest run or None)."""
        entry = self.cards.get(card or "")
        if not entry:
            return (f"never measured; the default rests on {', '.join(self.cards) or 'no card'}",
                    None)
        runs = entry.get("runs", [])
        return entry.get("summary") or entry.get("verdict", ""), runs[0] if runs else None


@dataclass(frozen=True)
class DefaultsTable:
    source: str
    backends: dict[str, BackendDefault]


def load_defaults(path: str | None = None) -> DefaultsTable:
    """The shipped table, or the decisions file ``path`` (a pipeline ``decisions.json``)."""
    if path is None:
        text, source = resources.files("fusedqk").joinpath("data/defaults.json").read_text(), SHIPPED
    else:
        file = Path(path)
        if not path.strip():
            raise UserError(f"{ENV_DEFAULTS}={shown(path)} is empty; give the path of a defaults table "
                            "or of a pipeline decisions.json, or leave it unset for the shipped table")
        try:
            if not file.is_file():
                raise UserError(f"{ENV_DEFAULTS}={shown(path)}: no such file; give the path of a "
                                "defaults table or of a pipeline decisions.json")
            text, source = file.read_text(encoding="utf-8"), str(file)
            _verified(file, path)
        except (OSError, UnicodeDecodeError) as e:
            why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else e.strerror
            raise UserError(f"{ENV_DEFAULTS}={shown(path)}: cannot be read ({why}); give the path of "
                            "a defaults table or of a pipeline decisions.json") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{ENV_DEFAULTS}={source!r} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or data.get("schema") != DEFAULTS_SCHEMA:
        raise UserError(f"{ENV_DEFAULTS}={source!r}: expected a JSON object with "
                        f"\"schema\": \"{DEFAULTS_SCHEMA}\" and a \"backends\" object")
    backends = data.get("backends")
    if not isinstance(backends, dict):
        raise UserError(f"{ENV_DEFAULTS}={source!r}: \"backends\" must be an object of backend → entry")
    table = {}
    for backend, entry in backends.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("fused_qk_norm"), bool):
            raise UserError(f"{ENV_DEFAULTS}={source!r}: backends.{backend}.fused_qk_norm must be "
                            "true or false")
        impl = entry.get("impl", "auto")
        if impl not in IMPLS:
            raise UserError(f"{ENV_DEFAULTS}={source!r}: backends.{backend}.impl={impl!r}; accepted: "
                            f"{', '.join(IMPLS)}")
        cards = entry.get("cards") or {}
        if not isinstance(cards, dict):
            raise UserError(f"{ENV_DEFAULTS}={source!r}: backends.{backend}.cards must be an object "
                            "of card name → evidence")
        table[backend] = BackendDefault(entry["fused_qk_norm"], impl, str(entry.get("reason", "")),
                                        str(entry.get("evidence", "")), cards,
                                        str(entry.get("summary", "")))
    return DefaultsTable(source, table)


def _verified(file: Path, given: str) -> None:
    """A decisions file inside a sealed run is evidence only while the run matches its
    manifest: an edited copy is refused, never trusted."""
    from fusedqk.archive import sealed_run_of, verify

    run = sealed_run_of(file.resolve())
    if run is None:
        return
    problems = verify(run)
    if problems:
        raise UserError(f"{ENV_DEFAULTS}={shown(given)}: the run {str(run)!r} does not match its "
                        f"manifest ({problems[0]}); a decision is taken only from a run that "
                        "verifies (`fusedqk verify RUN`)")


@dataclass(frozen=True)
class Resolution:
    """What path a process runs on a backend, and why."""

    backend: str
    path: str  # "graph" or "fused"
    impl: str  # "kernel", "kernel_kv" or "composite" (meaningful when path is "fused")
    path_source: str
    impl_source: str


def resolve(backend: str, has_kernel: bool, env: Mapping[str, str] | None = None) -> Resolution:
    """Resolve the path and implementation from the environment, else the defaults table."""
    env = os.environ if env is None else env
    table = load_defaults(env.get(ENV_DEFAULTS))
    if ENV_KERNEL_CALL in env:  # read only where a kernel runs, checked everywhere
        parse_kernel_call(env[ENV_KERNEL_CALL])
    entry = table.backends.get(backend)
    if ENV_TOGGLE in env:
        enabled = parse_toggle(env[ENV_TOGGLE])
        path_source = f"{ENV_TOGGLE}={env[ENV_TOGGLE]}"
    elif entry is not None:
        enabled = entry.fused_qk_norm
        path_source = f"default for {backend} from {table.source}: {entry.reason} [{entry.evidence}]"
    else:
        enabled = False
        path_source = f"{table.source} has no entry for {backend}; off"
    if ENV_IMPL in env:
        impl, impl_source = parse_impl(env[ENV_IMPL]), f"{ENV_IMPL}={env[ENV_IMPL]}"
    elif entry is not None:
        impl, impl_source = entry.impl, f"default for {backend} from {table.source}"
    else:
        impl, impl_source = "auto", "no default; auto"
    if impl == "auto":
        impl = auto_impl(has_kernel)
        impl_source += f" (auto: {'this backend has a kernel' if has_kernel else 'no kernel here'})"
    return Resolution(backend, "fused" if enabled else "graph", impl, path_source, impl_source)


def auto_impl(has_kernel: bool) -> str:
    """What ``auto`` means: the kernel where the backend has one, else the composite."""
    return "kernel" if has_kernel else "composite"


def concrete_path(name: str | None, backend: str, has_kernel: bool, impl: str | None = None,
                  flag: str = "--path", env: Mapping[str, str] | None = None) -> str:
    """The path that runs (graph, composite, kernel or kernel_kv) for a requested ``name`` of
    PATH_NAMES.

    ``name`` None means what the toggle says; ``fused`` means ``impl``, and ``impl`` None means
    the toggle's implementation, ``auto`` the kernel where the backend has one. ``flag`` names the
    input in errors. The one place where ``auto`` and ``fused`` are resolved.
    """
    if name is None:
        if resolve(backend, has_kernel, env).path == "graph":
            return "graph"
        name = "fused"
    if name not in PATH_NAMES:
        raise UserError(f"{flag}: {name!r} is not a path; accepted: {', '.join(PATH_NAMES)}")
    if name == "fused":
        if impl is not None:
            name, flag = parse_impl(impl, "--impl"), "--impl"
        else:
            resolved = resolve(backend, has_kernel, env)
            # Name what chose the implementation: the variable, or the defaults table.
            name, flag = resolved.impl, resolved.impl_source.split(" (")[0]
        name = auto_impl(has_kernel) if name == "auto" else name
    if name in KERNEL_PATHS and not has_kernel:
        raise UserError(f"{flag}: the kernel has no {backend} version (kernels exist for cuda and "
                        "metal); use composite on this backend")
    return name
