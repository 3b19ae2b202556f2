"""Which operation holds a fresh process's first-use cost: one registry model, loaded from
fusedqk's cached checkpoint, and each part of a prefill timed on its first and its second call
in the same process: layer 0's attention and its MLP (for an MoE model also at 7 and 8 tokens,
either side of mlx-lm's threshold for sorting tokens by expert), then whole-model prefills.

    python tools/first_use.py MODEL [--prompt-tokens 64]

Prints one row per call (seconds, synchronised), then which files appeared in MLX's kernel
folder during the run. A part whose first call is slow and whose second is fast pays a
per-process build; one slow both times is slow in itself.
"""

from __future__ import annotations

import argparse
import os
import time

STARTED = time.perf_counter()

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from fusedqk import caches  # noqa: E402
from fusedqk.backend import current_backend, device_info  # noqa: E402
from fusedqk.models import Quantization, resolve_dtype  # noqa: E402

IMPORTED = time.perf_counter()


def timed(rows: list[tuple[str, float]], label: str, fn) -> None:
    mx.synchronize()
    start = time.perf_counter()
    mx.eval(fn())
    mx.synchronize()
    rows.append((label, time.perf_counter() - start))
    print(f"{label}: {rows[-1][1]:.3f} s", flush=True)


def kernel_files() -> dict[str, float]:
    folder = os.environ.get(caches.ENV_PTX_CACHE)
    if not folder or not os.path.isdir(folder):
        return {}
    return {name: os.path.getmtime(os.path.join(folder, name)) for name in os.listdir(folder)}


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    return parser


def main() -> None:
    args = setup_arg_parser().parse_args()
    backend = current_backend()
    caches.use_shared_kernel_cache(backend, device_info().device_name)
    before = kernel_files()
    rows: list[tuple[str, float]] = [("imports", IMPORTED - STARTED)]
    start = time.perf_counter()
    loaded = caches.load_synthetic(args.model, Quantization(4, 64, resolve_dtype("auto", backend)),
                                   0, backend)
    model = loaded.model
    mx.eval(model.parameters())
    rows.append(("weights", time.perf_counter() - start))
    layer = model.model.layers[0]
    hidden = loaded.config["hidden_size"]
    dtype = model.model.embed_tokens.scales.dtype if hasattr(model.model.embed_tokens, "scales") \
        else mx.bfloat16
    key = mx.random.key(0)
    sizes = [args.prompt_tokens]
    if "num_experts" in loaded.config:
        sizes += [8, 7]
    for m in sizes:
        x = (mx.random.normal((1, m, hidden), key=key) * 0.1).astype(dtype)
        for call in (1, 2):
            timed(rows, f"layer 0 attention, {m} tokens, call {call}",
                  lambda x=x, m=m: layer.self_attn(x, mask="causal" if m > 1 else None))
        for call in (1, 2):
            timed(rows, f"layer 0 mlp, {m} tokens, call {call}", lambda x=x: layer.mlp(x))
    vocab = loaded.config["vocab_size"]
    for m in (args.prompt_tokens, 1):
        tokens = mx.random.randint(2, vocab, (1, m), key=key)
        for call in (1, 2):
            timed(rows, f"model prefill, {m} tokens, call {call}",
                  lambda tokens=tokens: model(tokens, cache=make_prompt_cache(model)))
    after = kernel_files()
    print("\n| part | s |\n|---|---|")
    for label, s in rows:
        print(f"| {label} | {s:.3f} |")
    new = sorted(set(after) - set(before))
    print(f"\nkernel folder {os.environ.get(caches.ENV_PTX_CACHE)}: {len(before)} files before, "
          f"{len(new)} new: {', '.join(new) or 'none'}")
    nv = os.path.expanduser(os.environ.get("CUDA_CACHE_PATH", "~/.nv/ComputeCache"))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(nv) for f in fs)
    print(f"driver compute cache {nv}: {size / 2**20:.1f} MiB; "
          + ", ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("CUDA_CACHE")))


if __name__ == "__main__":
    main()
