"""The plan of a pipeline run, made once on the host that starts it: which backends, the device
label and run directory of each, the run name, and every measurement job's flags.

The workflow (workflow/rules/common.smk) takes all of this from here, so detection and flag
spelling live once, in the package. Imports no MLX: the planning host may not have it.
"""

from __future__ import annotations

import datetime
import fcntl
import math
import os
import platform
import re
import shlex
import subprocess
from dataclasses import dataclass

import jsonschema
import yaml

from fusedqk import registry
from fusedqk.caches import ENV_CACHE_DIR, cache_root
from fusedqk.errors import UserError
from fusedqk.hostinfo import (
    BACKENDS,
    ENV_VISIBLE,
    device_name,
    gpu_backends,
    gpu_indices,
    slug,
    visible_gpus,
)
from fusedqk.outputs import check_dir
from fusedqk.results import BenchSettings

MEASUREMENTS = ("bench", "identity", "blockbench")


def detect_backends() -> list[str]:
    """What this host has: a GPU backend where there is one, else the CPU."""
    return gpu_backends() or ["cpu"]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()


def source_state() -> tuple[str, str]:
    """(commit date YYYYMMDD, <commit>[-dirty]) of the tree here: the same in every process of a
    run, unlike the clock. Without git: today's UTC date and ``nogit``."""
    try:
        commit = _git("rev-parse", "--short=10", "HEAD")
        day = _git("log", "-1", "--format=%cd", "--date=format:%Y%m%d")
        dirty = "-dirty" if _git("status", "--porcelain", "--untracked-files=no") else ""
        return day, f"{commit}{dirty}"
    except (OSError, subprocess.CalledProcessError):
        return f"{datetime.datetime.now(datetime.UTC):%Y%m%d}", "nogit"


@dataclass(frozen=True)
class Plan:
    backends: list[str]
    run_name: str
    git_commit: str
    device_labels: dict[str, str]
    results_dir: str

    def run_dir(self, backend: str) -> str:
        return f"{self.results_dir}/{backend}-{self.device_labels[backend]}/{self.run_name}"


class ConfigError(Exception):
    """A configuration the workflow must refuse before any job: one line naming the key."""


def load_config_file(path: str) -> dict:
    """The workflow's base configuration file; a malformed one is one ConfigError line naming it."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"config error: {path}: cannot be read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config error: {path} is not valid YAML "
                          f"({getattr(e, 'problem', None) or 'malformed'}{where})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path} must hold a mapping of keys, got "
                          f"{type(data).__name__}")
    return data


def merge_config(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` laid over it, nested mappings merged key by key (as
    Snakemake's ``--configfile`` and ``--config`` overlay one another)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_config(merged[key], value)
        else:
            merged[key] = value
    return merged


def validate_config(config: dict, schema: dict) -> None:
    """Refuse a configuration the schema does not accept: one ConfigError line naming the key
    (the most relevant of jsonschema's errors)."""
    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        key = ".".join(str(p) for p in error.absolute_path) or "config"
        raise ConfigError(f"config error: {key}: {error.message}")


def workflow_config(base_path: str, overrides: dict, schema_path: str) -> dict:
    """The pipeline's configuration: the base file (config/config.yaml), overridden by what
    ``--configfile`` and ``--config`` gave, numbers given as text turned into numbers, then
    checked against the schema. Every refusal is one ConfigError line."""
    with open(schema_path) as f:
        schema = yaml.safe_load(f)
    config = coerce_scalars(merge_config(load_config_file(base_path), overrides), schema)
    validate_config(config, schema)
    return config


def start(config: dict, remote_argv: list[str] | None) -> Plan:
    """The run's plan at the workflow's start: made from ``config`` on the host that starts it,
    or, inside a job a scheduler started (``remote_argv``: its command line), read back from the
    run directories its targets name."""
    targets = target_runs(remote_argv) if remote_argv is not None else []
    the_plan = plan_for_job(config, targets) if targets else make_plan(config)
    check_cache_dir(config["cache_dir"])
    return the_plan


# Lock files held open for the life of the workflow's main process, one per run folder it writes.
_CLAIMED: list[int] = []


def claim_runs(run_dirs: list[str]) -> None:
    """One pipeline per run folder: the workflow's main process holds a lock beside each run
    folder until it exits, so a second pipeline (another checkout, whose Snakemake lock is its
    own) naming the same folder stops at its start instead of overwriting the first one's
    measurements. The lock file is opened without following a link."""
    for run in run_dirs:
        parent, name = os.path.split(os.path.abspath(run))
        lock = os.path.join(parent, f".{name}.pipeline.lock")
        try:
            os.makedirs(parent, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(f"run folder {run}: cannot open its pipeline lock {lock} "
                              f"({e.strerror}); results_dir must be a folder you can write, "
                              "without links planted in it") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 400).decode(errors="replace").strip() or "holder unknown"
            os.close(fd)
            raise ConfigError(f"run folder {run} is being written by another pipeline "
                              f"({holder}); wait for it to end, or give another run_name") from None
        except OSError:  # a filesystem without locks (some network mounts): no claim to make
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {platform.node()}, working directory {os.getcwd()}, "
                     f"since {datetime.datetime.now(datetime.UTC):%Y-%m-%dT%H:%M:%SZ}".encode())
        _CLAIMED.append(fd)


def check_cache_dir(cache_dir: str) -> None:
    """``auto`` takes the environment's FUSEDQK_CACHE_DIR: refuse a bad one before any job."""
    if cache_dir == "auto":
        try:
            cache_root()
        except UserError as e:
            raise ConfigError(f"cache_dir: auto: {e}") from None


def native_command(python: str, cache_dir: str) -> list[str]:
    """The command that runs ``fusedqk`` on the host, with the configuration's cache folder
    (``auto``: the job's own default, nothing set)."""
    env = [] if cache_dir == "auto" else ["env", f"{ENV_CACHE_DIR}={cache_dir}"]
    return [*env, python, "-m", "fusedqk"]


def gpu_devices(gpus: dict) -> list[str]:
    """The GPUs a cuda run spreads its jobs over: ``gpus.devices``, or for ``auto`` the entries
    of ``CUDA_VISIBLE_DEVICES`` (a scheduler's grant), else every GPU ``nvidia-smi`` lists, else
    none (jobs then run unpinned)."""
    if gpus["devices"] != "auto":
        return [str(d) for d in gpus["devices"]]
    try:
        visible = visible_gpus()
    except UserError as e:
        raise ConfigError(f"gpus.devices: auto: {e}") from None
    return visible if visible is not None else gpu_indices()


def gpu_of(models: list[str], model: str, devices: list[str]) -> str | None:
    """The GPU a model's jobs run on: the backend's models dealt over the devices in order
    (model k on device k mod n), so a run of three models on three GPUs uses each once."""
    if not devices or model not in models:
        return None
    return devices[models.index(model) % len(devices)]


def pinned(command: list[str], gpu: str | None, in_container: bool) -> list[str]:
    """``command`` run on ``gpu`` only: ``CUDA_VISIBLE_DEVICES`` in the environment of the
    native command, or passed into the container (``<engine> run -e``)."""
    if gpu is None:
        return command
    if in_container:
        at = command.index("run") + 1
        return [*command[:at], "-e", f"{ENV_VISIBLE}={gpu}", *command[at:]]
    return ["env", f"{ENV_VISIBLE}={gpu}", *command]


def container_command(container: dict, backend: str, image: str, results_dir: str,
                      cache_dir: str = "auto") -> list[str]:
    """The command that runs ``fusedqk`` inside ``image``: the engine's run with the config's
    arguments (and GPU arguments on cuda), the results folder mounted at the same relative path
    it has here (or the same absolute one), the cache folder (``auto``: the host's default)
    mounted at its own path, the image's tag recorded in FUSEDQK_IMAGE_ID."""
    args = [container["engine"], "run", "--rm", *container["run_args"]]
    if backend == "cuda":
        args += container["gpu_args"]
    inside = results_dir if os.path.isabs(results_dir) else f"{container['workdir']}/{results_dir}"
    args += ["-v", f"{os.path.abspath(results_dir)}:{inside}"]
    if cache_dir != "off":
        host = str(cache_root()) if cache_dir == "auto" else cache_dir
        os.makedirs(host, exist_ok=True)
        args += ["-v", f"{host}:{host}"]
        cache_dir = host
    return [*args, "-w", container["workdir"], "-e", f"{ENV_CACHE_DIR}={cache_dir}",
            "-e", f"FUSEDQK_IMAGE_ID={image}", image, "fusedqk"]


# Host memory a measuring job asks a scheduler for: a base for the process, plus the model's
# weights in bf16 (synthetic weights are made at full precision, then quantized), twice for
# identity (its fresh-process controls). Models outside the registry (checkpoint folders) get
# UNKNOWN_MODEL_MB.
BASE_JOB_MB = 2000
UNKNOWN_MODEL_MB = 64000


def job_mem_mb(model: str, job: str) -> int:
    config = registry.configs().get(model)
    weights_mb = (-(-registry.approx_parameters(config) * 2 // 2**20) if config
                  else UNKNOWN_MODEL_MB)
    return BASE_JOB_MB + weights_mb * (2 if job == "identity" else 1)


def exclusive_flag(backend: str) -> str:
    """sbatch's extra flag for a measuring job: the whole node where the CPU is measured (any
    other job on it would share the cores); a GPU job already has its GPU to itself."""
    return "--exclusive" if backend == "cpu" else ""


def coerce_scalars(value: object, schema: dict, defs: dict | None = None) -> object:
    """``value`` with the strings that the schema types as numbers or booleans turned into them.

    Snakemake's ``--config key={a: {b: 5}}`` keeps nested scalars as strings; a string the
    schema wants as a number is parsed, and ``true``/``false`` (as YAML 1.2 spells them, any
    case) where it wants a boolean; anything else is left as it is, so the schema names it."""
    defs = defs if defs is not None else schema.get("$defs", {})
    if "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return {k: coerce_scalars(v, props.get(k, {}), defs) for k, v in value.items()}
    if isinstance(value, str) and schema.get("type") in ("integer", "number"):
        try:
            number = float(value)
        except ValueError:
            return value
        if not math.isfinite(number):
            return value
        return int(number) if schema["type"] == "integer" and number.is_integer() else number
    if isinstance(value, str) and schema.get("type") == "boolean" \
            and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, str) and "enum" in schema and value not in schema["enum"]:
        return next((e for e in schema["enum"] if str(e) == value), value)
    return value


def _non_finite(value: object, where: str = "") -> str | None:
    """The key path of the first number in ``value`` that is NaN or infinite (YAML's .nan and
    .inf pass a schema's bounds, since every comparison with NaN is false), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        found = _non_finite(inner, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def check_config(config: dict, backends: list[str]) -> None:
    """What the schema cannot say, checked before any job (each a ``ConfigError``)."""
    bad = _non_finite(config)
    if bad:
        raise ConfigError(f"config error: {bad} is not a finite number (NaN or infinity); give a "
                          "number")
    for key in ("results_dir", "checkpoints_dir", "cache_dir"):
        value = config.get(key)
        # Every rule quotes the paths it passes to a shell; control characters are refused
        # outright, since no file name a user means has them (a newline ends a shell command).
        if isinstance(value, str) and any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ConfigError(f"config error: {key}={value!r} holds a control character (a "
                              "newline, tab or escape); give a plain folder path")
        if key == "cache_dir" and value in ("auto", "off"):
            continue
        try:
            check_dir(key, value)
        except UserError as e:
            raise ConfigError(f"config error: {e}") from None
    names = set(registry.configs())
    for backend in backends:
        s = config["backend_settings"].get(backend)
        if s is None:
            raise ConfigError(f"config error: backends lists {backend!r} but backend_settings has "
                              f"no {backend!r} entry")
        key = f"backend_settings.{backend}"
        # A model name becomes a folder of the run: one plain path component.
        for model in s["models"]:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", str(model)):
                raise ConfigError(f"config error: {key}.models: {str(model)!r} is not accepted; a "
                                  "model name is letters, digits, '.', '_' and '-', starting with a "
                                  "letter or digit")
        twice = sorted({m for m in s["models"] if s["models"].count(m) > 1})
        if twice:
            raise ConfigError(f"config error: {key}.models names {', '.join(twice)} more than "
                              "once; name each model once")
        bench = s["bench"]
        problem = BenchSettings(rounds=bench["rounds"], max_rounds=bench.get("max_rounds"),
                                target_half_width=bench.get("target_half_width"),
                                max_measure_s=bench.get("max_measure_s")).round_limit_problem()
        if problem:
            raise ConfigError(f"config error: {key}.bench: {problem}")
        if engine(s) != "builtin":
            mapped = _engine_models(s, key)
            for model in s["models"]:
                if model not in mapped:
                    raise ConfigError(f"config error: {key}.models: {model!r} has no entry in the "
                                      f"engine file's models ({', '.join(mapped)}); add "
                                      f"`{model}: export` or `{model}: <checkpoint directory>`")
            continue
        for model in s["models"]:
            if model not in names:
                raise ConfigError(f"config error: {key}.models: {model!r} is not a registry model "
                                  f"({', '.join(sorted(names))})")
        # A context longer than a model's would fail every job after the start.
        for job in ("bench", "identity"):
            need = s[job]["prompt_tokens"] + s[job].get("generation_tokens", s[job].get("tokens", 0))
            for model in s["models"]:
                limit = registry.configs()[model].get("max_position_embeddings")
                if limit and need > limit:
                    raise ConfigError(f"config error: {key}.{job}: {need} tokens of context is more "
                                      f"than {model} takes ({limit}); shorten prompt_tokens")
        # A kernel path on a backend without the kernel would fail every job after the start.
        kernels = [i for i in s.get("impls", []) if i in ("kernel", "kernel_kv")]
        if kernels and backend not in ("cuda", "metal"):
            raise ConfigError(f"config error: {key}.impls names {', '.join(kernels)}, but {backend} "
                              "has no fused kernel (kernels exist for cuda and metal); use "
                              "composite there")


def _engine_models(settings: dict, key: str) -> list[str]:
    """The model names a command engine's file maps (to a directory or to ``export``), after
    the whole file is checked: a broken engine file stops the run before any job."""
    from fusedqk.engines.command import load_engine

    try:
        return list(load_engine(engine(settings)).models)
    except UserError as e:
        raise ConfigError(f"config error: {key}.engine: {e}") from None


def check_backends(config: dict, backends: list[str]) -> None:
    """A backend the configuration names must be here, unless the device label is given: a login
    node plans for compute nodes it cannot see (docs/cluster.md)."""
    if config["backends"] == "auto" or config["device_label"] != "auto":
        return
    here = [*detect_backends(), "cpu"]
    for backend in backends:
        if backend not in here:
            raise ConfigError(f"config error: backends lists {backend!r} but this machine has no "
                              f"{backend} device (it has: {', '.join(dict.fromkeys(here))}); where "
                              "the jobs run elsewhere (a cluster), give device_label too")


def make_plan(config: dict) -> Plan:
    """The run's plan from a validated pipeline configuration (docs/configuration.md)."""
    backends = detect_backends() if config["backends"] == "auto" else list(config["backends"])
    check_backends(config, backends)
    check_config(config, backends)
    day, commit = source_state()
    # auto: <commit date>-<commit>[-dirty]; a named run keeps its name.
    name = config["run_name"] if config["run_name"] != "auto" else f"{day}-{commit}"
    labels = {b: (config["device_label"] if config["device_label"] != "auto"
                  else slug(device_name(b))) for b in backends}
    return Plan(backends, name, commit, labels, config["results_dir"])


def target_runs(argv: list[str]) -> list[str]:
    """The run directories a job's ``--target-jobs rule:wildcard=value,...`` arguments name."""
    runs, taking = [], False
    for arg in argv:
        if arg.startswith("-"):
            taking = arg == "--target-jobs"
            continue
        if taking:
            wildcards = dict(kv.split("=", 1) for kv in arg.split(":", 1)[-1].split(",") if "=" in kv)
            if "run" in wildcards and wildcards["run"] not in runs:
                runs.append(wildcards["run"])
    return runs


def plan_for_job(config: dict, run_dirs: list[str]) -> Plan:
    """The plan inside a job a scheduler started (Snakemake's remote mode), read back from the
    run directories its targets name: those were resolved on the host that started the
    workflow, and a compute node must not detect again (it may see another device than a login
    node, and would name another run directory)."""
    backends, labels, names, roots = [], {}, set(), set()
    for run in run_dirs:
        parent, name = os.path.split(run.rstrip("/"))
        root, group = os.path.split(parent)
        backend, _, label = group.partition("-")
        if not (name and label and backend in BACKENDS):
            raise ConfigError(f"a job's run directory {run!r} is not "
                              "<results_dir>/<backend>-<device>/<run_name>")
        if backend not in backends:
            backends.append(backend)
        labels[backend] = label
        names.add(name)
        roots.add(root)
    if len(names) != 1 or len(roots) != 1:
        raise ConfigError(f"a job's targets name more than one run: {', '.join(run_dirs)}")
    check_config(config, backends)
    return Plan(backends, names.pop(), source_state()[1], labels, roots.pop())


def model_args(settings: dict, backend: str) -> list[str]:
    q = settings["quantization"]
    return ["--backend", backend, "--bits", str(q["bits"]), "--group-size", str(q["group_size"]),
            "--dtype", q["dtype"]]


def engine(settings: dict) -> str:
    """``builtin`` or the path of a command engine's YAML file."""
    return settings.get("engine", "builtin")


def impls(settings: dict) -> list[str]:
    """The fused implementations a run compares with graph: a command engine has one fused arm."""
    return settings["impls"] if engine(settings) == "builtin" else ["fused"]


def measurements(settings: dict) -> list[str]:
    """The measurement jobs of each model: a command engine has no block benchmark."""
    return list(MEASUREMENTS if engine(settings) == "builtin" else MEASUREMENTS[:2])


def job_args(settings: dict, backend: str, job: str, checkpoints_dir: str | None = None) -> list[str]:
    """The ``fusedqk <job>`` flags of one backend's measurement job (model and outputs aside)."""
    args = model_args(settings, backend)
    if engine(settings) != "builtin":
        args += ["--engine", engine(settings)]
        if checkpoints_dir:
            args += ["--checkpoint-dir", checkpoints_dir]
    if job == "bench":
        b = settings["bench"]
        args += ["--paths", ",".join(["graph", *impls(settings)]), "-p", str(b["prompt_tokens"]),
                 "-g", str(b["generation_tokens"]), "-r", str(b["rounds"]), "-w", str(b["warmup"]),
                 "-c", str(b["chunk_tokens"])]
        if "target_half_width" in b:
            args += ["--target-half-width", str(b["target_half_width"])]
            if "max_rounds" in b:  # else the command's default
                args += ["--max-rounds", str(b["max_rounds"])]
            if "max_measure_s" in b:
                args += ["--max-measure-s", str(b["max_measure_s"])]
    elif job == "identity":
        i = settings["identity"]
        args += ["--impls", ",".join(impls(settings)), "-p", str(i["prompt_tokens"]),
                 "-n", str(i["tokens"]), "-k", str(i["prompts"])]
        if not i["cudnn_sdpa"]:
            args.append("--no-cudnn-sdpa")
        if i.get("concurrent_controls"):
            args.append("--concurrent-controls")
    elif job == "blockbench":
        args += ["--reps", str(settings["blockbench"]["reps"])]
    else:
        raise ValueError(f"unknown measurement job {job!r}")
    return args


def env_flags(settings: dict) -> str:
    """``fusedqk env``'s flags for one backend's run: the engine file, where there is one."""
    return "" if engine(settings) == "builtin" else shlex.join(["--engine", engine(settings)])


def job_flags(settings: dict, backend: str, job: str, checkpoints_dir: str | None = None) -> str:
    """``job_args`` as one shell-quoted string, for a rule's command line."""
    return shlex.join(job_args(settings, backend, job, checkpoints_dir))

