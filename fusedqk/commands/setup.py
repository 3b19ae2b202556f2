"""Commands that set up or describe: env, doctor, record-config, build-ext, build-llama-cpp,
models, export."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fusedqk.commands.flags import (
    DTYPE_CHOICES,
    seed_number,
)
from fusedqk.errors import UserError


def cmd_env(args: argparse.Namespace) -> int:
    from fusedqk.backend import select_backend
    from fusedqk.envinfo import env_report, render_env

    backend = select_backend(args.backend)
    report = env_report(backend)
    if args.engine != "builtin":
        # A run's environment.json names the engine it measured: its version, the checks of
        # its binary, and for llama.cpp the commit and every build flag.
        from fusedqk.engines.command import load_engine

        spec = load_engine(args.engine)
        report["engine"] = spec.describe(spec.check_requirements(backend))
    print(json.dumps(report, indent=2) if args.json else render_env(report, backend))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from fusedqk import doctor

    checks = doctor.cuda_checks(doctor.parse_targets(args.targets), args.require_gpu)
    print(doctor.as_json(checks) if args.json else doctor.render(checks))
    return 0 if all(c.ok for c in checks if c.required) else 1


def cmd_record_config(args: argparse.Namespace) -> int:
    """The pipeline's merged configuration, as the run's ``config.yaml`` (the workflow passes it
    as JSON, so no shell quoting of YAML is involved)."""
    import yaml

    from fusedqk.atomic import write_text
    from fusedqk.errors import UserError

    try:
        config = json.loads(args.config)
    except json.JSONDecodeError as e:
        raise UserError(f"--config: not JSON ({e.msg} at character {e.pos}); give the "
                        "configuration as one JSON object") from None
    if not isinstance(config, dict):
        raise UserError(f"--config: a JSON {type(config).__name__}; give the configuration as "
                        "one JSON object")
    write_text(args.out, yaml.safe_dump(config, sort_keys=False))
    return 0


def cmd_build_ext(args: argparse.Namespace) -> int:
    from fusedqk.doctor import parse_targets
    from fusedqk.kernels.cuda_ext.build import build

    built = build(Path(args.build_dir), Path(args.mlx_root) if args.mlx_root else None,
                  Path(args.fmt_include) if args.fmt_include else None,
                  tuple(parse_targets(args.targets)))
    print(f"built {built}")
    return 0


def cmd_build_llama_cpp(args: argparse.Namespace) -> int:
    import os

    from fusedqk import llama_cpp

    # Where PyPI cannot be reached, the source given once in the environment serves every build
    # (the engine files' builds at first use read the same variable).
    given = args.source or os.environ.get(llama_cpp.ENV_SOURCE)
    source = Path(given) if given else None
    if args.pack_source:
        if source is None:
            raise UserError("--pack-source needs --source: the llama-cpp-python source "
                            "distribution to pack")
        llama_cpp.check_source(source)
        print(f"wrote {llama_cpp.pack_source(source, Path(args.pack_source))}")
        return 0
    done = llama_cpp.build(args.backend, source, args.cuda_arch, args.jobs,
                           log=lambda line: print(line, file=sys.stderr, flush=True))
    info = done.info
    print(f"llama.cpp {info['commit'][:12]} for {info['backend']} in {done.folder} "
          f"(built in {info['build_seconds']} s)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from fusedqk.models import registry_rows, render_registry

    rows = registry_rows()
    print(json.dumps(rows, indent=2) if args.json else render_registry(rows))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fusedqk.backend import current_backend
    from fusedqk.export import export
    from fusedqk.models import Quantization, resolve_dtype

    dtype = resolve_dtype(args.dtype, current_backend())
    quant = Quantization(args.bits, args.group_size, dtype)
    if args.format == "gguf":
        from fusedqk.gguf_export import export_gguf

        done = export_gguf(args.model, Path(args.out), quant, args.seed)
        print(f"wrote {done.path}: {done.tensors} tensors, {done.nbytes / 2**30:.2f} GiB, "
              f"GGUF {done.quantization} (MLX {args.bits}-bit g{args.group_size} codes, scales "
              "and biases), byte-level vocabulary")
        return 0
    report = export(args.model, Path(args.out), quant, args.seed)
    print(f"wrote {report.path}: {report.parameters / 1e6:.1f}M parameters, "
          f"{report.weight_bytes / 2**30:.2f} GiB in {report.shards} shard(s), word-level tokenizer")
    return 0



def add_parsers(sub) -> None:
    p = sub.add_parser("env", help="backend, device, versions and the resolved fused-path default")
    p.add_argument("--backend", default="auto")
    p.add_argument("--engine", default="builtin",
                   help="an engine YAML file: also record it (version, binary checks, build)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("doctor", help="check, without a GPU and without loading MLX, every "
                       "library, header and compiler the cuda backend loads, and the C++ "
                       "primitive; exit 1 if one is missing")
    p.add_argument("--backend", choices=["cuda"], default="cuda",
                   help="the backend to check (cuda: cpu and metal need nothing beyond MLX)")
    p.add_argument("--targets", default="90", help="GPU architectures the kernel must compile "
                   "for, as sm numbers separated by commas (default 90: Hopper)")
    p.add_argument("--require-gpu", action="store_true",
                   help="a missing GPU or driver is a failure too (on a GPU host)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("record-config", help="write the pipeline configuration a run is made "
                       "with (JSON in) as the run's config.yaml")
    p.add_argument("--config", required=True, help="the configuration as one JSON object")
    p.add_argument("--out", required=True, help="the YAML file to write")
    p.set_defaults(func=cmd_record_config)

    p = sub.add_parser("build-ext", help="build the optional C++ primitive for CUDA "
                       "(docs/kernels.md); no GPU needed, no network")
    p.add_argument("--build-dir", default="build/cuda-ext", help="CMake's build folder")
    p.add_argument("--mlx-root", help="the mlx package folder with include/ and lib/libmlx.so "
                   "(default: the installed mlx)")
    p.add_argument("--fmt-include", help="the folder holding fmt/format.h (default: the system's)")
    p.add_argument("--targets", default="90", help="GPU architectures the kernel is checked to "
                   "compile for at build, as sm numbers separated by commas (default 90); on a "
                   "GPU NVRTC compiles it at first use for the card's own")
    p.set_defaults(func=cmd_build_ext)

    p = sub.add_parser("models", help="the model registry with sizes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("export", help="write a registry model's synthetic weights as an MLX "
                       "checkpoint directory (mlx_lm.load and other MLX engines open it)")
    p.add_argument("model", help="registry name (see `fusedqk models`)")
    p.add_argument("--out", required=True, help="the new checkpoint directory")
    p.add_argument("--bits", type=int, default=4, choices=(4, 8))
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="activation dtype (default auto: float32 on cpu, bfloat16 on a GPU)")
    p.add_argument("--seed", type=seed_number, default=0)
    p.add_argument("--format", default="mlx", choices=("mlx", "gguf"),
                   help="mlx: a checkpoint directory (default); gguf: one GGUF file for "
                   "llama.cpp (4-bit only, as Q4_1)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("build-llama-cpp", help="build llama.cpp's llama-bench and llama-server "
                       "from the pinned source, once per machine (fusedqk/llama_cpp.py)")
    p.add_argument("--backend", default="cpu", help="cpu or cuda")
    p.add_argument("--source", help="the llama-cpp-python source distribution (.tar.gz) or a "
                   "pack made by --pack-source (default: $FUSEDQK_LLAMA_CPP_SOURCE, else "
                   "downloaded from PyPI)")
    p.add_argument("--cuda-arch", default="90", help="CUDA compute capability to build for "
                   "(default 90: Hopper)")
    p.add_argument("--jobs", type=int, help="parallel compile jobs (default: every core)")
    p.add_argument("--pack-source", metavar="FILE", help="instead of building, write the parts "
                   "of --source the build needs as one .tar.xz (about 5 MB), for a machine "
                   "without PyPI")
    p.set_defaults(func=cmd_build_llama_cpp)
