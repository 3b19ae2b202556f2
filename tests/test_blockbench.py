"""The block benchmark's timing loop: paths take turns, so they share the host's states."""

from __future__ import annotations

import mlx.core as mx

from fusedqk.blockbench import interleaved_us


def test_paths_take_turns_in_a_rotating_order():
    calls: list[str] = []

    def path(name: str):
        def block():
            calls.append(name)
            return mx.array(1.0)
        return block

    timed = interleaved_us({n: path(n) for n in ("graph", "kernel", "launch")}, reps=4, warmup=2)
    assert calls[:6] == ["graph"] * 2 + ["kernel"] * 2 + ["launch"] * 2  # warm-up, path by path
    rounds = [calls[6 + 3 * i: 9 + 3 * i] for i in range(4)]
    assert rounds == [["graph", "kernel", "launch"], ["kernel", "launch", "graph"],
                      ["launch", "graph", "kernel"], ["graph", "kernel", "launch"]]
    assert set(timed) == {"graph", "kernel", "launch"}
    for median, p10, p90 in timed.values():
        assert 0 < p10 <= median <= p90
