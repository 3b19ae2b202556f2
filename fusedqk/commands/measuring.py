"""Commands that measure or decode: generate, bench, identity, blockbench (bench and identity
also through an engine file)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fusedqk.commands.flags import (
    MAX_PROMPTS,
    MAX_REPS,
    MAX_ROUNDS,
    check_context,
    count,
    engine_flags,
    fraction,
    measure_seconds,
    model_flags,
    model_ref,
    non_negative_float,
    prepare,
    result_flags,
    round_count,
    token_count,
)
from fusedqk.errors import UserError
from fusedqk.results import BenchSettings
from fusedqk.toggle import IMPLS, PATH_NAMES


def _engine_target(args: argparse.Namespace):
    """A command engine's (spec, backend, checkpoint directory) from the flags; the checkpoint is
    exported here when the engine file says ``export`` and none exists yet."""
    from fusedqk import external
    from fusedqk.backend import select_backend
    from fusedqk.engines.command import load_engine
    from fusedqk.models import resolve_dtype

    spec = load_engine(args.engine)
    backend = select_backend(args.backend)
    where = external.checkpoint_dir(spec, args.model, args.bits, args.group_size,
                                   resolve_dtype(args.dtype, backend), args.seed, backend,
                                   args.checkpoint_dir)
    return spec, backend, where


def _engine_identity(args: argparse.Namespace) -> int:
    from fusedqk import external, formats

    if args.no_cudnn_sdpa:  # the engine's processes inherit it (MLX engines read it)
        from fusedqk.identity import MLX_CUDNN_SDPA_ENV

        os.environ[MLX_CUDNN_SDPA_ENV] = "0"
    spec, backend, where = _engine_target(args)
    result = external.identity(spec, args.model, where, backend, external.vocab_size(where),
                              args.prompt_tokens,
                              args.tokens, args.prompts, args.seed)
    if args.out_dir:
        formats.dump("identity", result, Path(args.out_dir) / "identity-fused.json")
    print(external.render_identity(result))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from fusedqk.engines.builtin import generate_once

    check_context(args, args.max_tokens)
    result = generate_once(model_ref(args), args.path, args.impl, args.prompt_tokens,
                           args.max_tokens, args.temp, args.seed, args.warmup)
    print(json.dumps(result) if args.json else " ".join(map(str, result["tokens"])))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    settings = BenchSettings(
        prompt_tokens=args.prompt_tokens, generation_tokens=args.generation_tokens,
        rounds=args.rounds, warmup=args.warmup, chunk_tokens=args.chunk_tokens, seed=args.seed,
        target_half_width=args.target_half_width, max_rounds=args.max_rounds,
        max_measure_s=args.max_measure_s)
    problem = settings.round_limit_problem(spell=lambda name: "--" + name.replace("_", "-"))
    if problem:
        raise UserError(problem)
    check_context(args, args.generation_tokens)
    from fusedqk import instrument

    if args.engine != "builtin":
        from fusedqk import external

        spec, backend, where = _engine_target(args)
        run = external.bench(spec, args.model, where, backend, external.vocab_size(where), settings,
                            argv=sys.argv)
    else:
        from fusedqk import bench  # after the checks: it imports MLX and mlx-lm (~2 s)
        from fusedqk.backend import select_backend

        bench.size_graph_cache()
        paths = bench.expand_paths(args.paths, select_backend(args.backend), args.impl)
        run = bench.measure_decode(prepare(args), paths, settings, argv=sys.argv)
    if args.out_dir:
        instrument.write_results(run, Path(args.out_dir))
    print(instrument.render_table(run, args.output))
    return 0


def cmd_identity(args: argparse.Namespace) -> int:
    check_context(args, args.tokens)
    if args.engine != "builtin":
        return _engine_identity(args)
    from fusedqk import formats, identity
    ref = model_ref(args)
    s = identity.IdentitySettings(args.prompt_tokens, args.tokens, args.prompts, args.seed,
                                  not args.no_cudnn_sdpa, args.concurrent_controls)

    for result in identity.check_identity(ref, s, args.impls, controls=not args.no_controls):
        if args.out_dir:
            formats.dump("identity", result, Path(args.out_dir) / f"identity-{result['impl']}.json")
        print(identity.render_verdict(result))
    return 0


def cmd_blockbench(args: argparse.Namespace) -> int:
    from fusedqk import blockbench

    names = None
    if args.paths is not None:
        names = tuple(p.strip() for p in args.paths.split(",") if p.strip())
        if not names or any(n not in blockbench.BLOCK_PATHS for n in names):
            raise UserError(f"--paths {args.paths!r}: accepted names are "
                            f"{', '.join(blockbench.BLOCK_PATHS)}")
        from fusedqk.backend import select_backend

        blockbench.check_backend(names, select_backend(args.backend))
    prep = prepare(args)
    settings = blockbench.Settings(args.batch, args.reps, args.warmup, args.bandwidth, names)
    result = blockbench.measure_blocks(prep, settings)
    if args.out_dir:
        blockbench.write_results(result, Path(args.out_dir))
    print(blockbench.render_table(result, args.output))
    return 0



def add_parsers(sub) -> None:
    p = sub.add_parser("generate", help="decode and print token ids")
    model_flags(p)
    p.add_argument("--path", choices=PATH_NAMES,
                   help="default: what the toggle says (fusedqk env)")
    p.add_argument("--impl", choices=IMPLS,
                   help="what --path fused means (default: the toggle's implementation)")
    p.add_argument("-p", "--prompt-tokens", type=token_count, default=16)
    p.add_argument("-n", "--max-tokens", type=token_count, default=64)
    p.add_argument("--temp", type=non_negative_float, default=0.0)
    p.add_argument("-w", "--warmup", type=count(MAX_ROUNDS, low=0), default=0,
                   help="untimed generations before the one printed (default 0)")
    p.add_argument("--json", action="store_true",
                   help="one JSON line: tokens, prefill and decode tok/s, peak memory, seconds from "
                        "the process's start to its first decoded token, and where they went")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="decode throughput, fused vs graph, interleaved rounds")
    model_flags(p)
    p.add_argument("-p", "--prompt-tokens", type=token_count, default=64)
    p.add_argument("-g", "--generation-tokens", type=token_count, default=128)
    p.add_argument("-r", "--rounds", type=round_count, default=15,
                   help="rounds (the least, with --target-half-width; default 15)")
    p.add_argument("--target-half-width", type=fraction, metavar="F",
                   help="after --rounds, add rounds until every speedup's 95%% CI half-width is at "
                        "most F of the speedup (e.g. 0.01), up to --max-rounds")
    p.add_argument("--max-rounds", type=round_count,
                   help="the most rounds --target-half-width may run (default 4 x --rounds)")
    p.add_argument("--max-measure-s", type=measure_seconds, metavar="S",
                   help="with --target-half-width: stop adding rounds once the rounds took S "
                        "seconds (default: no time limit)")
    p.add_argument("-w", "--warmup", type=count(MAX_ROUNDS), default=2, help="warm-up trials per path")
    p.add_argument("-c", "--chunk-tokens", type=token_count, default=16,
                   help="paths take turns every this many tokens within a round (default 16)")
    p.add_argument("--paths", default="graph,fused",
                   help=f"comma list of {', '.join(PATH_NAMES)} (default graph,fused)")
    p.add_argument("--impl", default="auto", choices=IMPLS,
                   help="what `fused` in --paths means (default auto)")
    engine_flags(p)
    result_flags(p, "trials.csv, tokens.csv and bench.json")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("identity", help="are fused and graph outputs bitwise the same?")
    model_flags(p)
    p.add_argument("--impls", default="fused",
                   help="comma list of fused implementations to check: fused (auto), "
                        f"{', '.join(IMPLS[1:])} (default fused)")
    p.add_argument("-p", "--prompt-tokens", type=token_count, default=64)
    p.add_argument("-n", "--tokens", type=token_count, default=256)
    p.add_argument("-k", "--prompts", type=count(MAX_PROMPTS), default=3)
    p.add_argument("--no-controls", action="store_true",
                   help="skip the fresh-process controls (each path's teacher-forced logits again)")
    p.add_argument("--concurrent-controls", action="store_true",
                   help="run the fresh-process controls alongside the check, not after it "
                        "(faster; two copies of the model must fit the device)")
    p.add_argument("--no-cudnn-sdpa", action="store_true",
                   help="CUDA: keep attention on MLX's own kernel (sets MLX_CUDA_USE_CUDNN_SDPA=0); "
                        "MLX's cuDNN attention, used from a 256-token context, does not reproduce "
                        "itself across processes")
    engine_flags(p)
    result_flags(p, "identity-<impl>.json", table=False)
    p.set_defaults(func=cmd_identity)

    p = sub.add_parser("blockbench", help="time the QKV+norm+RoPE block of all layers, per path")
    model_flags(p)
    p.add_argument("-b", "--batch", type=count(MAX_PROMPTS), default=1)
    p.add_argument("--reps", type=count(MAX_REPS), default=50)
    p.add_argument("-w", "--warmup", type=count(MAX_REPS, low=0), default=5)
    p.add_argument("--bandwidth", default="measure",
                   help="memory bandwidth in GB/s for the floor, or `measure` (default)")
    p.add_argument("--paths",
                   help="comma list of graph, composite, kernel, kernel_kv (with its cache "
                        "write), launch (the kernel's launch with an empty body), "
                        "kernel-cuda_kernel, launch-cuda_kernel; default: every one this "
                        "backend runs (kernel rows only where a kernel exists, kernel_kv and "
                        "the -cuda_kernel rows only through the C++ primitive)")
    result_flags(p, "blockbench.csv and blockbench.json")
    p.set_defaults(func=cmd_blockbench)
