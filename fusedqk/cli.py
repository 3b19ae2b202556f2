"""The ``fusedqk`` command line: the parser, built from ``fusedqk.commands``, and the dispatch.

    fusedqk env | record-config | models | generate | export | bench | identity | decide | blockbench
            | aggregate | report | verify | failures | compare

Every command's output paths are checked before it runs; a measuring one runs under the device
lock; every user error exits 2 with one line on stderr naming the input and what is accepted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fusedqk import __version__
from fusedqk.commands import measuring, reporting, setup
from fusedqk.commands.flags import OneLineParser
from fusedqk.errors import UserError, first_line
from fusedqk.outputs import check_dir, check_file

# The commands that measure: each holds the host-wide device lock while it runs (devicelock.py),
# exclusively, except the identity check, which compares bits and may share the device with others.
MEASURING = ("bench", "identity", "blockbench")
SHARES_THE_DEVICE = ("identity",)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fusedqk", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"fusedqk {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log fallbacks and progress")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    for group in (setup, measuring, reporting):
        group.add_parsers(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    """The subcommand; a measuring one under the host-wide lock of its device (identity's
    control workers, ``fusedqk.identity_worker``, run under their parent's hold)."""
    if args.command not in MEASURING:
        return args.func(args)
    from fusedqk import devicelock
    from fusedqk.backend import select_backend

    with devicelock.hold(select_backend(args.backend),
                         shared=args.command in SHARES_THE_DEVICE):
        return args.func(args)


def _with_status(args: argparse.Namespace) -> int:
    """Run a measurement and record how it ended in ``args.status`` instead of failing: one model
    that runs out of memory or fails to compile must not stop a pipeline's other models."""
    from fusedqk import phases
    from fusedqk.atomic import write_json

    try:
        code = _run(args)
        status = {"ok": code == 0, "command": args.command, "error": None}
    except Exception as e:  # recorded, reported, and the pipeline goes on
        message = first_line(e)
        print(f"fusedqk: error: {message}", file=sys.stderr)
        status = {"ok": False, "command": args.command, "error": message}
    # Where the job's time went (weights, warm-up, measurement), for the run's report.
    try:
        write_json(args.status, {**status, "seconds": phases.snapshot()})
    except OSError as e:  # a full disk: the status contract cannot be kept; say so, fail
        print(f"fusedqk: error: --status {args.status}: cannot be written ({e.strerror or e}); "
              f"the job {'succeeded' if status['ok'] else 'failed'} but its status is lost",
              file=sys.stderr)
        return 2
    return 0


# Output flags and what they name, checked before any work (``fusedqk.outputs``).
OUTPUT_FLAGS = {"out_dir": ("--out-dir", check_dir), "status": ("--status", check_file),
                "checkpoint_dir": ("--checkpoint-dir", check_dir)}
OUT_FLAG = {"export": check_dir, "decide": check_file, "report": check_dir,
            "record-config": check_file}


def _check_outputs(args: argparse.Namespace) -> None:
    """Every output path a command names: a path it can write, and never inside a sealed run
    (unless the command takes --rewrite and was given it: it unseals the run itself)."""
    outputs = [(flag, check, getattr(args, attr, None))
               for attr, (flag, check) in OUTPUT_FLAGS.items()]
    if args.command in OUT_FLAG:
        # A GGUF export is one file, an MLX one a directory.
        gguf = getattr(args, "format", None) == "gguf"
        outputs.append(("--out", check_file if gguf else OUT_FLAG[args.command], args.out))
    outputs.append(("--pack-source", check_file, getattr(args, "pack_source", None)))
    for flag, check, value in outputs:
        check(flag, value)
        if value is not None and not getattr(args, "rewrite", False):
            from fusedqk.archive import refuse_sealed

            refuse_sealed(Path(value), flag)


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
    except ImportError as e:
        # A compiled module that cannot load names itself by its short name ("core") and path.
        if (e.name or "").split(".")[0] not in ("mlx", "mlx_lm") and "/mlx/" not in (e.path or ""):
            raise
        print(f"fusedqk: error: {mlx_unloadable(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def mlx_unloadable(e: ImportError) -> str:
    """One line for an MLX that is installed but cannot load: MLX's CUDA build on a host
    without the NVIDIA driver (a CPU host, a container started without the GPU)."""
    why = first_line(e)
    if "libcuda.so" in why:
        return (f"MLX's CUDA build cannot load here ({why}): this host has no NVIDIA driver, or "
                "the container was started without the GPU (--gpus all, or CDI); `fusedqk "
                "doctor` checks everything else the cuda backend needs")
    return f"MLX cannot load here ({why}); `fusedqk doctor` checks the cuda backend's needs"
