"""Where does the graph path stop reproducing itself in a fresh process? (device tool)

On the H100 (MLX 0.32.4) the identity controls of every seed model first differ 224-243 decode
steps after a 32-token prompt: a context of about 256, which is also the size by which mlx-lm's
KVCache grows (``KVCache.step``). This probe separates the two candidates. For each cache step
it runs the graph path's teacher-forced logits in two fresh processes and prints the first step
whose logits differ between them: if that step follows the cache step, the cache growth is the
trigger; if it stays near context 256 whatever the step, a length-dependent kernel is.

    python tools/probe_determinism.py [model] [steps]     e.g. qwen3-0.6b 128,256,4096
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

from fusedqk.identity import first_divergence

PROMPT, TOKENS = 32, 288


def child(model: str, cache_step: int) -> None:
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models import cache

    from fusedqk.decode import random_prompt, teacher_forced_logits
    from fusedqk.models import Quantization, load_model

    cache.KVCache.step = cache_step
    lm = load_model(model, Quantization(4, 64, "bfloat16"), 0)
    seq = random_prompt(lm.config["vocab_size"], PROMPT + TOKENS, 1000)
    steps = teacher_forced_logits(lm.model, seq, PROMPT)
    print(json.dumps([hashlib.sha256(np.array(s.astype(mx.float32)).tobytes()).hexdigest() for s in steps]))


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "qwen3-0.6b"
    steps = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "128,256,4096").split(",")]
    print(f"{model}: graph path, teacher-forced, prompt {PROMPT}, {TOKENS} steps, two processes")
    print("| KVCache.step | first differing step | its context length |\n|---|---|---|")
    for step in steps:
        runs = [json.loads(subprocess.run(
            [sys.executable, __file__, "--child", model, str(step)], capture_output=True,
            text=True, check=True).stdout) for _ in range(2)]
        first = first_divergence(*runs)
        where = "none" if first is None else str(PROMPT + first + 1)
        print(f"| {step} | {first if first is not None else 'none'} | {where} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], int(sys.argv[3]))
    else:
        main()
