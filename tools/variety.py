"""Distinct token ids in greedy decodes of the synthetic weights, per quantization.

    python tools/variety.py qwen3-0.6b qwen3-8b ... [--combos 4:64:bfloat16,8:64:bfloat16]

Prints one markdown row per (model, bits, group size, dtype): the distinct ids in each of three
128-token greedy decodes (graph path, 64-token random prompts). The identity rule's variety
threshold (docs/configuration.md, identity_min_distinct) rests on these counts.
"""

from __future__ import annotations

import argparse
import time

from fusedqk.decode import generate, make_sampler, random_prompt
from fusedqk.engines.builtin import ModelRef, prepare


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--combos", default="4:64:bfloat16,8:64:bfloat16,8:128:float16,4:32:float16")
    parser.add_argument("-n", "--tokens", type=int, default=128)
    args = parser.parse_args()
    print("| model | bits | group | dtype | distinct ids per prompt | build s |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        for combo in args.combos.split(","):
            bits, group, dtype = combo.split(":")
            start = time.perf_counter()
            prep = prepare(ModelRef(model, "auto", int(bits), int(group), dtype))
            built = time.perf_counter() - start
            prep.paths.use("graph")
            vocab = prep.loaded.config["vocab_size"]
            counts = [len(set(generate(prep.loaded.model, random_prompt(vocab, 64, seed),
                                       args.tokens, make_sampler(0.0, seed)).tokens))
                      for seed in range(3)]
            print(f"| {model} | {bits} | {group} | {dtype} | {counts} | {built:.0f} |", flush=True)
            del prep


if __name__ == "__main__":
    main()
