"""Commands that set up or describe: env, record-config, build-ext, models, export."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fusedqk.commands.flags import (
    DTYPE_CHOICES,
    seed_number,
)


def cmd_env(args: argparse.Namespace) -> int:
    from fusedqk.backend import select_backend
    from fusedqk.envinfo import env_report, render_env

    backend = select_backend(args.backend)
    report = env_report(backend)
    print(json.dumps(report, indent=2) if args.json else render_env(report, backend))
    return 0


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



def add_parsers(sub) -> None:
    p = sub.add_parser("env", help="backend, device, versions and the resolved fused-path default")
    p.add_argument("--backend", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_env)

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
    p.set_defaults(func=cmd_export)
