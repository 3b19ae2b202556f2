"""What several commands share: the one-line parser, the ranges counts accept, the model,
engine and result flags, and turning parsed flags into a model reference."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

from fusedqk.errors import UserError

if TYPE_CHECKING:  # the heavy modules load only in the subcommands that need them
    from fusedqk.engines.builtin import ModelRef, Prepared

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")


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
MAX_MEASURE_S = 7 * 24 * 3600.0


def number(cast: type, low: float, name: str, high: float = math.inf):
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


def count(high: int, low: int = 1):
    return number(int, low, "a whole number", high)


token_count = count(MAX_TOKENS)
round_count = count(MAX_ROUNDS)
seed_number = count(MAX_SEED, low=0)
measure_seconds = number(float, 1.0, "a number of seconds", MAX_MEASURE_S)


def fraction(value: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 < f < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must lie strictly between 0 and 1 (e.g. 0.01)")
    return f


non_negative_float = number(float, 0.0, "a number")


def check_context(args: argparse.Namespace, new_tokens: int) -> None:
    """Prompt plus generated tokens must fit the model's context, before any decoding. (A name
    that only a command engine's file maps is checked by the engine once it resolves it.)"""
    from fusedqk import registry

    engine = getattr(args, "engine", "builtin")
    known = registry.configs()
    if engine != "builtin" and args.model not in known and not Path(args.model).is_dir():
        return
    if args.model in known:  # a registry name needs no MLX (importing it costs ~1.5 s)
        config = known[args.model]
    else:
        from fusedqk.models import model_config

        config = model_config(args.model)
    prompt_tokens = args.prompt_tokens
    limit = config.get("max_position_embeddings")
    if limit and prompt_tokens + new_tokens > limit:
        raise UserError(f"--prompt-tokens {prompt_tokens} + {new_tokens} generated tokens exceed "
                        f"the model's context of {limit} (max_position_embeddings)")


def result_flags(p: argparse.ArgumentParser, writes: str, table: bool = True) -> None:
    """Where a measuring command's results go: -o (the printed table), --out-dir, --status."""
    if table:
        p.add_argument("-o", "--output", default="md", choices=("md", "csv", "json"))
    p.add_argument("--out-dir", help=f"write {writes} here")
    p.add_argument("--status", help="record success or the error here and exit 0 (pipelines)")


def engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default="builtin",
                   help="builtin (fusedqk's in-process decode) or an engine YAML file "
                        "(config/engines/*.yaml, docs/engines.md)")
    p.add_argument("--checkpoint-dir", help="where a command engine's exported checkpoints go "
                   "(default $FUSEDQK_CHECKPOINTS, else $FUSEDQK_CACHE_DIR/checkpoints)")


def model_flags(p: argparse.ArgumentParser, default_model: str = "qwen3-tiny") -> None:
    p.add_argument("-m", "--model", default=default_model,
                   help="registry name (see `fusedqk models`) or a local MLX checkpoint directory")
    p.add_argument("--backend", default="auto", help="auto, cpu, cuda or metal (default: auto)")
    p.add_argument("--bits", type=int, default=4, choices=(4, 8), help="weight bits (default 4)")
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128),
                   help="quantization group size (default 64)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="activation dtype (default auto: float32 on cpu, bfloat16 on a GPU)")
    p.add_argument("--seed", type=seed_number, default=0,
                   help=f"seed of weights and prompts, 0 to {MAX_SEED} (default 0)")


def model_ref(args: argparse.Namespace) -> ModelRef:
    from fusedqk.engines.builtin import ModelRef

    return ModelRef(args.model, args.backend, args.bits, args.group_size, args.dtype, args.seed)


def prepare(args: argparse.Namespace) -> Prepared:
    from fusedqk.engines.builtin import prepare

    return prepare(model_ref(args))
