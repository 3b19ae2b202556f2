"""Where mlx-lm's server spends a token, without HTTP: one checkpoint decoded greedily by
fusedqk's own decode loop (``fusedqk.decode.generate``, the built-in instrument's), by mlx-lm's
single-sequence loop (``generate_step``) and by its batched generator (``BatchGenerator`` with one
request, the loop mlx-lm's server runs), in one process, the loops taking turns.

    FUSEDQK_FUSED_QK_NORM=0 python tools/server_breakdown.py CHECKPOINT [--tokens 128] [--repeats 6]

The model is loaded by ``mlx_lm.load`` and patched by ``fusedqk.patch`` (the toggle decides, as
in ``python -m fusedqk.mlx_lm server``). Prints one JSON line: the toggle and, per loop, the
median over repeats of the mean time per decoded token after the first (ms). Run once per arm;
the server's decode time per token minus the batched loop's is what HTTP and its threads add.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import mlx.core as mx
import numpy as np
from mlx_lm import load
from mlx_lm.generate import BatchGenerator, generate_step

from fusedqk.decode import generate, make_sampler
from fusedqk.patching import patch

GREEDY = make_sampler(0.0, 0)


def builtin_ms(model, prompt: list[int], tokens: int) -> float:
    result = generate(model, mx.array(prompt), tokens, GREEDY)
    return 1e3 * result.decode_s / len(result.token_times_s)


def single_ms(model, prompt: list[int], tokens: int) -> float:
    times = []
    steps = generate_step(mx.array(prompt), model, sampler=GREEDY)
    for _ in zip(range(tokens), steps, strict=False):
        times.append(time.perf_counter())
    return 1e3 * (times[-1] - times[0]) / (len(times) - 1)


def batched_ms(model, prompt: list[int], tokens: int) -> float:
    generator = BatchGenerator(model, max_tokens=tokens)
    generator.insert([prompt])
    times: list[float] = []
    while len(times) < tokens:
        _, responses = generator.next()
        for response in responses:
            times.append(time.perf_counter())
            if response.finish_reason is not None:
                tokens = len(times)
    generator.close()
    return 1e3 * (times[-1] - times[0]) / (len(times) - 1)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=6)
    return parser


def main() -> None:
    args = setup_arg_parser().parse_args()
    model, _ = load(args.checkpoint)
    summary = patch(model).summary()
    vocab = model.args.vocab_size
    prompt = [int(i) for i in np.random.default_rng(0).integers(2, vocab, args.prompt_tokens)]
    loops = {"builtin": builtin_ms, "single": single_ms, "batched": batched_ms}
    for loop in loops.values():  # untimed: compilation, the allocator's first growth
        loop(model, prompt, 16)
    samples: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.repeats):
        for name, loop in loops.items():
            samples[name].append(loop(model, prompt, args.tokens))
    print(json.dumps({"checkpoint": args.checkpoint,
                      "toggle": os.environ.get("FUSEDQK_FUSED_QK_NORM"), "patch": summary,
                      **{f"{name}_ms_per_token": float(np.median(v)) for name, v in samples.items()},
                      "samples_ms": samples}))


if __name__ == "__main__":
    main()
