"""The ``fusedqk`` command line: one subcommand per job, each a thin layer over one module.

    fusedqk env | models | generate | export | bench | identity | decide | blockbench
            | aggregate | report | verify | failures | compare

Every user error exits 2 with one line on stderr naming the input and what is accepted.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fusedqk import __version__
from fusedqk.errors import UserError
from fusedqk.outputs import check_dir, check_file

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")

if TYPE_CHECKING:  # the heavy modules load only in the subcommands that need them
    from fusedqk.engines.builtin import ModelRef, Prepared

log = logging.getLogger("fusedqk")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage dump), like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see --help)")


# The range every count accepts, checked before any work: large enough for any real use,
# small enough that a typo is refused instead of running for hours or overflowing
# (docs/configuration.md, "Command-line ranges").
MAX_TOKENS = 1 << 20
MAX_ROUNDS = 10_000
MAX_PROMPTS = 1_000
MAX_REPS = 1_000_000
MAX_SEED = (1 << 31) - 1


# The commands that measure: each holds the host-wide device lock while it runs (devicelock.py).
MEASURING = ("bench", "identity", "blockbench")


def _number(cast: type, low: float, name: str, high: float = math.inf):
    """An argparse type: ``cast`` of the text, finite, from ``low`` to ``high``."""
    def parse(value: str):
        try:
            n = cast(value)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{value!r} is not {name}") from None
        if not math.isfinite(n):
            raise argparse.ArgumentTypeError(f"{value!r} is not a finite number")
        if not low <= n <= high:
            bound = f"from {low} to {high}" if math.isfinite(high) else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value!r} is out of range: accepted {bound}")
        return n
    return parse


def _count(high: int, low: int = 1):
    return _number(int, low, "a whole number", high)


_tokens = _count(MAX_TOKENS)
_rounds = _count(MAX_ROUNDS)
_seed = _count(MAX_SEED, low=0)


def _fraction(value: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 < f < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must lie strictly between 0 and 1 (e.g. 0.01)")
    return f


_non_negative_float = _number(float, 0.0, "a number")


def _check_context(args: argparse.Namespace, new_tokens: int) -> None:
    """Prompt plus generated tokens must fit the model's context, before any decoding. (A name
    that only a command engine's file maps is checked by the engine once it resolves it.)"""
    from fusedqk.models import REGISTRY, model_config

    engine = getattr(args, "engine", "builtin")
    if engine != "builtin" and args.model not in REGISTRY and not Path(args.model).is_dir():
        return
    prompt_tokens = args.prompt_tokens
    limit = model_config(args.model).get("max_position_embeddings")
    if limit and prompt_tokens + new_tokens > limit:
        raise UserError(f"--prompt-tokens {prompt_tokens} + {new_tokens} generated tokens exceed "
                        f"the model's context of {limit} (max_position_embeddings)")


def _result_flags(p: argparse.ArgumentParser, writes: str, table: bool = True) -> None:
    """Where a measuring command's results go: -o (the printed table), --out-dir, --status."""
    if table:
        p.add_argument("-o", "--output", default="md", choices=("md", "csv", "json"))
    p.add_argument("--out-dir", help=f"write {writes} here")
    p.add_argument("--status", help="record success or the error here and exit 0 (pipelines)")


def _engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default="builtin",
                   help="builtin (fusedqk's in-process decode) or an engine YAML file "
                        "(config/engines/*.yaml, docs/engines.md)")
    p.add_argument("--checkpoint-dir", help="where a command engine's exported checkpoints go "
                   "(default $FUSEDQK_CHECKPOINTS, else ~/.cache/fusedqk/checkpoints)")


def _model_flags(p: argparse.ArgumentParser, default_model: str = "qwen3-tiny") -> None:
    p.add_argument("-m", "--model", default=default_model,
                   help="registry name (see `fusedqk models`) or a local MLX checkpoint directory")
    p.add_argument("--backend", default="auto", help="auto, cpu, cuda or metal (default: auto)")
    p.add_argument("--bits", type=int, default=4, choices=(4, 8), help="weight bits (default 4)")
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128),
                   help="quantization group size (default 64)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="activation dtype (default auto: float32 on cpu, bfloat16 on a GPU)")
    p.add_argument("--seed", type=_seed, default=0,
                   help=f"seed of weights and prompts, 0 to {MAX_SEED} (default 0)")


def _model_ref(args: argparse.Namespace) -> ModelRef:
    from fusedqk.engines.builtin import ModelRef

    return ModelRef(args.model, args.backend, args.bits, args.group_size, args.dtype, args.seed)


def _prepare(args: argparse.Namespace) -> Prepared:
    from fusedqk.engines.builtin import prepare

    return prepare(_model_ref(args))


# --- subcommands -------------------------------------------------------------------------------

def cmd_env(args: argparse.Namespace) -> int:
    from fusedqk.backend import select_backend
    from fusedqk.envinfo import env_report, render_env

    backend = select_backend(args.backend)
    report = env_report(backend)
    print(json.dumps(report, indent=2) if args.json else render_env(report, backend))
    return 0


def cmd_build_ext(args: argparse.Namespace) -> int:
    from fusedqk.kernels.cuda_ext.build import build

    built = build(Path(args.build_dir), Path(args.mlx_root) if args.mlx_root else None,
                  Path(args.fmt_include) if args.fmt_include else None)
    print(f"built {built}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from fusedqk.models import registry_rows, render_registry

    rows = registry_rows()
    print(json.dumps(rows, indent=2) if args.json else render_registry(rows))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from fusedqk.engines.builtin import generate_once

    _check_context(args, args.max_tokens)
    result = generate_once(_prepare(args), args.path, args.impl, args.prompt_tokens,
                           args.max_tokens, args.temp, args.seed, args.warmup)
    print(json.dumps(result) if args.json else " ".join(map(str, result["tokens"])))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from fusedqk import bench
    if args.max_rounds is not None and args.target_half_width is None:
        raise UserError("--max-rounds: only with --target-half-width (otherwise --rounds is the count)")
    if args.max_rounds is not None and args.max_rounds < args.rounds:
        raise UserError(f"--max-rounds {args.max_rounds} is below --rounds {args.rounds}; accepted: "
                        "at least --rounds")
    _check_context(args, args.generation_tokens)
    settings = bench.BenchSettings(
        prompt_tokens=args.prompt_tokens, generation_tokens=args.generation_tokens,
        rounds=args.rounds, warmup=args.warmup, chunk_tokens=args.chunk_tokens, seed=args.seed,
        target_half_width=args.target_half_width, max_rounds=args.max_rounds)
    if args.engine != "builtin":
        from fusedqk.engines import measure

        spec, backend, where = _engine_target(args)
        run = measure.bench(spec, args.model, where, backend, measure.vocab_size(where), settings,
                            argv=sys.argv)
    else:
        bench.size_graph_cache()
        prep = _prepare(args)
        paths = bench.expand_paths(args.paths, prep.backend, args.impl)
        run = bench.run(prep, paths, settings, argv=sys.argv)
    if args.out_dir:
        bench.write(run, Path(args.out_dir))
    print(bench.render(run, args.output))
    return 0


def cmd_identity(args: argparse.Namespace) -> int:
    from fusedqk import formats, identity
    _check_context(args, args.tokens)
    if args.engine != "builtin":
        return _engine_identity(args)
    ref = _model_ref(args)
    s = identity.IdentitySettings(args.prompt_tokens, args.tokens, args.prompts, args.seed,
                                  not args.no_cudnn_sdpa, args.concurrent_controls)
    from fusedqk.atomic import write_json

    for result in identity.run(ref, s, args.impls, controls=not args.no_controls):
        if args.out_dir:
            write_json(Path(args.out_dir) / f"identity-{result['impl']}.json",
                       formats.stamp("identity", result))
        print(identity.render(result))
    return 0


def _engine_target(args: argparse.Namespace):
    """A command engine's (spec, backend, checkpoint directory) from the flags; the checkpoint is
    exported here when the engine file says ``export`` and none exists yet."""
    from fusedqk.backend import select_backend
    from fusedqk.engines import measure
    from fusedqk.engines.command import load_engine
    from fusedqk.models import resolve_dtype

    spec = load_engine(args.engine)
    backend = select_backend(args.backend)
    where = measure.checkpoint_dir(spec, args.model, args.bits, args.group_size,
                                   resolve_dtype(args.dtype, backend), args.seed, args.checkpoint_dir)
    return spec, backend, where


def _engine_identity(args: argparse.Namespace) -> int:
    from fusedqk import formats
    from fusedqk.atomic import write_json
    from fusedqk.engines import measure

    if args.no_cudnn_sdpa:  # the engine's processes inherit it (MLX engines read it)
        from fusedqk.identity import MLX_CUDNN_SDPA_ENV

        os.environ[MLX_CUDNN_SDPA_ENV] = "0"
    spec, backend, where = _engine_target(args)
    result = measure.identity(spec, args.model, where, backend, measure.vocab_size(where),
                              args.prompt_tokens,
                              args.tokens, args.prompts, args.seed)
    if args.out_dir:
        write_json(Path(args.out_dir) / "identity-fused.json", formats.stamp("identity", result))
    print(measure.render_identity(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fusedqk.backend import current_backend
    from fusedqk.export import export
    from fusedqk.models import Quantization, resolve_dtype

    dtype = resolve_dtype(args.dtype, current_backend())
    report = export(args.model, Path(args.out), Quantization(args.bits, args.group_size, dtype),
                    args.seed)
    print(f"wrote {report.path}: {report.parameters / 1e6:.1f}M parameters, "
          f"{report.weight_bytes / 2**30:.2f} GiB in {report.shards} shard(s), word-level tokenizer")
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    from fusedqk import decide
    from fusedqk.archive import refuse_sealed

    if args.out and Path(args.out).is_dir():
        raise UserError(f"--out {args.out!r} is a directory; name the decisions file")
    refuse_sealed(Path(args.out or Path(args.run_dir) / "decisions.json"), "--out" if args.out
                  else "decide", args.rewrite)
    rule = decide.Rule(min_gain=args.min_gain, identity_policy=args.identity_policy,
                       min_distinct=args.min_distinct)
    decisions = decide.decide(Path(args.run_dir), rule)
    from fusedqk.atomic import write_json
    write_json(args.out or Path(args.run_dir) / "decisions.json", decisions)
    print(decide.render(decisions))
    return 0


def cmd_blockbench(args: argparse.Namespace) -> int:
    from fusedqk import blockbench

    names = None
    if args.paths is not None:
        names = tuple(p.strip() for p in args.paths.split(",") if p.strip())
        if not names or any(n not in blockbench.BLOCK_PATHS for n in names):
            raise UserError(f"--paths {args.paths!r}: accepted names are "
                            f"{', '.join(blockbench.BLOCK_PATHS)}")
    prep = _prepare(args)
    result = blockbench.run(prep, blockbench.Settings(args.batch, args.reps, args.warmup,
                                                      args.bandwidth, names))
    if args.out_dir:
        blockbench.write(result, Path(args.out_dir))
    print(blockbench.render(result, args.output))
    return 0


def cmd_aggregate(args: argparse.Namespace) -> int:
    from fusedqk import archive

    archive.refuse_sealed(Path(args.run_dir), "aggregate", args.rewrite)
    archive.aggregate(Path(args.run_dir))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fusedqk import report

    out = report.render_run(Path(args.from_dir), Path(args.out) if args.out else None,
                            rewrite=args.rewrite)
    print(f"wrote {', '.join(str(p) for p in out)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fusedqk import compare

    if args.index:
        if args.runs:
            raise UserError("compare: give run directories or --index RESULTS_DIR, not both")
        print(compare.index(Path(args.index), committed_only=args.committed), end="")
        return 0
    if args.committed:
        raise UserError("--committed: only with --index")
    if not args.runs:
        raise UserError("compare: name one or more archived run directories, or --index DIR")
    runs = [compare.summarize(Path(r)) for r in args.runs]
    print(compare.render(compare.compare(runs, args.by, args.mixed_workloads), args.output))
    return 0


def cmd_failures(args: argparse.Namespace) -> int:
    from fusedqk import archive

    failed = [f"{run}: {m.name}: {m.failed}" for run in args.run_dirs
              for m in archive.load_run(Path(run)).models.values() if m.failed]
    for line in failed:
        print(f"fusedqk: failed: {line}", file=sys.stderr)
    if failed:
        print(f"fusedqk: {len(failed)} model(s) failed; the report lists them and the run is "
              "sealed with what succeeded", file=sys.stderr)
    return 1 if failed else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from fusedqk import archive

    if args.write:
        if not Path(args.run_dir).is_dir():
            raise UserError(f"{args.run_dir}: no such run directory (verify --write seals an "
                            "existing run)")
        n = archive.write_manifest(Path(args.run_dir))
        print(f"wrote MANIFEST.sha256 ({n} files)")
        return 0
    problems = archive.verify(Path(args.run_dir))
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise UserError(f"{args.run_dir}: manifest check failed ({'; '.join(problems[:5])}{more})")
    print(f"{args.run_dir}: manifest OK")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fusedqk", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"fusedqk {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log fallbacks and progress")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("env", help="backend, device, versions and the resolved fused-path default")
    p.add_argument("--backend", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("build-ext", help="build the optional C++ primitive for CUDA "
                       "(docs/kernels.md); no GPU needed, no network")
    p.add_argument("--build-dir", default="build/cuda-ext", help="CMake's build folder")
    p.add_argument("--mlx-root", help="the mlx package folder with include/ and lib/libmlx.so "
                   "(default: the installed mlx)")
    p.add_argument("--fmt-include", help="the folder holding fmt/format.h (default: the system's)")
    p.set_defaults(func=cmd_build_ext)

    p = sub.add_parser("models", help="the model registry with sizes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("generate", help="decode and print token ids")
    _model_flags(p)
    p.add_argument("--path", choices=("graph", "fused", "composite", "kernel"),
                   help="default: what the toggle says (fusedqk env)")
    p.add_argument("--impl", choices=("auto", "kernel", "composite"),
                   help="what --path fused means (default: the toggle's implementation)")
    p.add_argument("-p", "--prompt-tokens", type=_tokens, default=16)
    p.add_argument("-n", "--max-tokens", type=_tokens, default=64)
    p.add_argument("--temp", type=_non_negative_float, default=0.0)
    p.add_argument("-w", "--warmup", type=_count(MAX_ROUNDS, low=0), default=0,
                   help="untimed generations before the one printed (default 0)")
    p.add_argument("--json", action="store_true",
                   help="one JSON line: tokens, prefill and decode tok/s, peak memory")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a registry model's synthetic weights as an MLX "
                       "checkpoint directory (mlx_lm.load and other MLX engines open it)")
    p.add_argument("model", help="registry name (see `fusedqk models`)")
    p.add_argument("--out", required=True, help="the new checkpoint directory")
    p.add_argument("--bits", type=int, default=4, choices=(4, 8))
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="activation dtype (default auto: float32 on cpu, bfloat16 on a GPU)")
    p.add_argument("--seed", type=_seed, default=0)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="decode throughput, fused vs graph, interleaved rounds")
    _model_flags(p)
    p.add_argument("-p", "--prompt-tokens", type=_tokens, default=64)
    p.add_argument("-g", "--generation-tokens", type=_tokens, default=128)
    p.add_argument("-r", "--rounds", type=_rounds, default=15,
                   help="rounds (the least, with --target-half-width; default 15)")
    p.add_argument("--target-half-width", type=_fraction, metavar="F",
                   help="after --rounds, add rounds until every speedup's 95%% CI half-width is at "
                        "most F of the speedup (e.g. 0.01), up to --max-rounds")
    p.add_argument("--max-rounds", type=_rounds,
                   help="the most rounds --target-half-width may run (default 4 x --rounds)")
    p.add_argument("-w", "--warmup", type=_count(MAX_ROUNDS), default=2, help="warm-up trials per path")
    p.add_argument("-c", "--chunk-tokens", type=_tokens, default=16,
                   help="paths take turns every this many tokens within a round (default 16)")
    p.add_argument("--paths", default="graph,fused",
                   help="comma list of graph, fused, composite, kernel (default graph,fused)")
    p.add_argument("--impl", default="auto", choices=("auto", "kernel", "composite"),
                   help="what `fused` in --paths means (default auto)")
    _engine_flags(p)
    _result_flags(p, "trials.csv, tokens.csv and bench.json")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("identity", help="are fused and graph outputs bitwise the same?")
    _model_flags(p)
    p.add_argument("--impls", default="fused",
                   help="comma list of fused implementations to check: fused (auto), kernel, "
                        "composite (default fused)")
    p.add_argument("-p", "--prompt-tokens", type=_tokens, default=64)
    p.add_argument("-n", "--tokens", type=_tokens, default=256)
    p.add_argument("-k", "--prompts", type=_count(MAX_PROMPTS), default=3)
    p.add_argument("--no-controls", action="store_true",
                   help="skip the fresh-process controls (each path's teacher-forced logits again)")
    p.add_argument("--concurrent-controls", action="store_true",
                   help="run the fresh-process controls alongside the check, not after it "
                        "(faster; two copies of the model must fit the device)")
    p.add_argument("--no-cudnn-sdpa", action="store_true",
                   help="CUDA: keep attention on MLX's own kernel (sets MLX_CUDA_USE_CUDNN_SDPA=0); "
                        "MLX's cuDNN attention, used from a 256-token context, does not reproduce "
                        "itself across processes")
    _engine_flags(p)
    _result_flags(p, "identity-<impl>.json", table=False)
    # Internal: the controls' fresh process; a comma list of paths whose teacher-forced logits
    # it runs, in that order.
    p.set_defaults(func=cmd_identity)

    p = sub.add_parser("decide", help="apply the decision rule to a run directory")
    p.add_argument("run_dir")
    p.add_argument("--min-gain", type=_number(float, 0.0, "a number", 1.0), default=0.01,
                   help="speedup CI lower bound must reach 1 + this (default 0.01)")
    p.add_argument("--identity-policy", default="exact", choices=("exact", "greedy-tokens"))
    p.add_argument("--min-distinct", type=_count(MAX_TOKENS, low=0), default=8,
                   help="an identity check passes only over greedy sequences of at least this "
                        "many distinct tokens (default 8)")
    p.add_argument("--out", help="default: RUN_DIR/decisions.json")
    p.add_argument("--rewrite", action="store_true",
                   help="redo the decision of a sealed run (unseals it; seal again with verify --write)")
    p.set_defaults(func=cmd_decide)

    p = sub.add_parser("blockbench", help="time the QKV+norm+RoPE block of all layers, per path")
    _model_flags(p)
    p.add_argument("-b", "--batch", type=_count(MAX_PROMPTS), default=1)
    p.add_argument("--reps", type=_count(MAX_REPS), default=50)
    p.add_argument("-w", "--warmup", type=_count(MAX_REPS, low=0), default=5)
    p.add_argument("--bandwidth", default="measure",
                   help="memory bandwidth in GB/s for the floor, or `measure` (default)")
    p.add_argument("--paths",
                   help="comma list of graph, composite, kernel, launch (the kernel's launch with "
                        "an empty body); default: every one this backend runs (kernel and launch "
                        "only where a kernel exists)")
    _result_flags(p, "blockbench.csv and blockbench.json")
    p.set_defaults(func=cmd_blockbench)

    p = sub.add_parser("aggregate", help="tidy tables of every trial and summary in a run")
    p.add_argument("run_dir")
    p.add_argument("--rewrite", action="store_true",
                   help="redo a sealed run's tables (unseals it; seal again with verify --write)")
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("report", help="render report.md and report.html from a run's raw data")
    p.add_argument("--from", dest="from_dir", required=True, help="the run directory")
    p.add_argument("--out", help="output directory (default: the run directory, unless sealed)")
    p.add_argument("--rewrite", action="store_true",
                   help="re-render a sealed run in place once it verifies, and seal it again")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="archived runs side by side: speedups with CIs, what "
                       "each run was, where they disagree")
    p.add_argument("runs", nargs="*", help="sealed run directories")
    p.add_argument("--by", default="model", choices=("model", "device", "commit"),
                   help="how runs are ordered and labelled (default model: by date)")
    p.add_argument("-o", "--output", default="md", choices=("md", "csv", "json"))
    p.add_argument("--mixed-workloads", action="store_true",
                   help="put runs with different workloads in one table")
    p.add_argument("--index", metavar="RESULTS_DIR",
                   help="print the list of every run under RESULTS_DIR, marking those git does not "
                        "track as yours (results/README.md)")
    p.add_argument("--committed", action="store_true",
                   help="with --index: only the runs git tracks (how results/README.md is made)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("failures", help="name the models of finished runs that failed; exit 1 "
                       "if any did (the pipeline's last step)")
    p.add_argument("run_dirs", nargs="+")
    p.set_defaults(func=cmd_failures)

    p = sub.add_parser("verify", help="check (or --write) a run directory's MANIFEST.sha256")
    p.add_argument("run_dir")
    p.add_argument("--write", action="store_true")
    p.set_defaults(func=cmd_verify)
    return parser


def _run(args: argparse.Namespace) -> int:
    """The subcommand; a measuring one under the host-wide lock of its device (identity's
    control workers, ``fusedqk.identity_worker``, run under their parent's)."""
    if args.command not in MEASURING:
        return args.func(args)
    from fusedqk import devicelock
    from fusedqk.backend import select_backend

    with devicelock.exclusive(select_backend(args.backend)):
        return args.func(args)


def _with_status(args: argparse.Namespace) -> int:
    """Run a measurement and record how it ended in ``args.status`` instead of failing: one model
    that runs out of memory or fails to compile must not stop a pipeline's other models."""
    from fusedqk.atomic import write_json

    try:
        code = _run(args)
        write_json(args.status, {"ok": code == 0, "command": args.command, "error": None})
    except Exception as e:  # recorded, reported, and the pipeline goes on
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"fusedqk: error: {message}", file=sys.stderr)
        write_json(args.status, {"ok": False, "command": args.command, "error": message})
    return 0


# Output flags and what they name, checked before any work (``fusedqk.outputs``).
OUTPUT_FLAGS = {"out_dir": ("--out-dir", check_dir), "status": ("--status", check_file),
                "checkpoint_dir": ("--checkpoint-dir", check_dir)}
OUT_FLAG = {"export": check_dir, "decide": check_file, "report": check_dir}


def _check_outputs(args: argparse.Namespace) -> None:
    for attr, (flag, check) in OUTPUT_FLAGS.items():
        check(flag, getattr(args, attr, None))
    if args.command in OUT_FLAG:
        OUT_FLAG[args.command]("--out", args.out)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _check_outputs(args)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="fusedqk: %(message)s", stream=sys.stderr)
        if getattr(args, "status", None):
            return _with_status(args)
        return _run(args)
    except UserError as e:
        # One line always, whatever text the input carried into the message.
        print(f"fusedqk: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
