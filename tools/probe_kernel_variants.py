"""Bitwise check of source variants of the fused kernel (device tool, for kernel work).

Each variant is the shipped CUDA source with one text substitution; each is compiled under its
own name and compared with the graph path on the same random qwen3-0.6b-shaped case.
"""

from __future__ import annotations

import mlx.core as mx

from fusedqk.kernels import qkv_norm_rope as k
from tests.test_kernel_gpu import SHAPES, graph_block, make_case, ulp_stats

FMA = "__hadd2(__hfma2(code, scale2, offset2), bias2)"
VARIANTS = {
    "shipped (fma dequant)": [],
    "sub, mul, add dequant": [(FMA, "__hadd2(__hmul2(__hsub2(code, __hneg2(pair_of<T>::neg_magic())),"
                                    " scale2), bias2)")],
}


def run(name: str, source: str) -> str:
    kern = mx.fast.cuda_kernel(
        name=f"probe_{abs(hash(source)):x}",
        input_names=["x", "w", "scales", "biases", "q_norm", "k_norm", "positions", "counters"],
        output_names=["q_out", "k_out", "v_out", "proj"], source=source,
        header=k.CUDA_HEADER + "constexpr float EPS = 0x1.0c6f7ap-20f;\n"
        f"constexpr float LOG2_BASE = {k._float_literal(19.931568569324174)};\n")
    layout, x, ws, norms = make_case(SHAPES["qwen3-0.6b"], 4, 64, mx.bfloat16, 1, 5)
    want = graph_block(x, ws, norms, layout, 17)
    w, s, b = (mx.concatenate([t[i] for t in ws]) for i in range(3))
    kern_obj = k.QKVNormRope(layout, mx.bfloat16, "cuda")
    kern_obj.kernel = kern
    got = kern_obj(x, w, s, b, norms[0], norms[1], mx.array([17], mx.int32),
                   k.new_counters(layout))
    mx.eval(want, got)
    return " ".join(f"{n}:{ulp_stats(g, r)[0]:.4f}" for n, g, r in zip("qkv", got, want, strict=True))


def main() -> None:
    for name, subs in VARIANTS.items():
        src = k.CUDA_SOURCE
        for old, new in subs:
            assert old in src, (name, old)
            src = src.replace(old, new)
        print(f"| {name} | {run(name, src)} |")


if __name__ == "__main__":
    main()
