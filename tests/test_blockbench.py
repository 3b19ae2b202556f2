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
    for median, p10, p90, first_call_us in timed.values():
        assert 0 < p10 <= median <= p90 and first_call_us > 0
    assert all(t.first_call_us is None for t in interleaved_us({"graph": path("graph")}, 2, 0).values())


def test_the_launch_rows_missing_bandwidth_prints_as_a_dash():
    from fusedqk.blockbench import render_table

    row = {"model": "m", "path": "launch", "token_us": 10.0, "build_us": 5.0, "layer_us": 1.0,
           "token_gbs": None, "floor_token_us": 2.0, "token_over_floor": 5.0,
           "speedup_vs_graph": 2.5}
    table = render_table({"rows": [row, {**row, "path": "kernel", "token_gbs": 123.456}]}, "md")
    assert "nan" not in table
    assert "—" in table.splitlines()[2] and "123.46" in table


def test_graph_nodes_counts_the_unevaluated_primitives_only():
    import mlx.core as mx

    from fusedqk.blockbench import graph_nodes

    weight = mx.ones((4, 4))
    mx.eval(weight)
    x = mx.ones((1, 4))
    mx.eval(x)
    assert graph_nodes([x @ weight]) == 1
    assert graph_nodes([mx.exp(x @ weight)]) == 2  # matmul, exp
    # Adding a scalar broadcasts it first: matmul, exp, broadcast, add.
    assert graph_nodes([mx.exp(x @ weight) + 1]) == 4


def test_a_result_without_node_counts_renders_without_their_columns():
    from fusedqk.blockbench import render_table

    row = {"model": "m", "path": "graph", "token_us": 10.0, "build_us": 5.0, "layer_us": 1.0,
           "token_gbs": 1.0, "floor_token_us": 2.0, "token_over_floor": 5.0,
           "speedup_vs_graph": 1.0}
    assert "nodes/layer" not in render_table({"rows": [row]}, "md")
    counted = render_table(
        {"rows": [{**row, "nodes_per_layer": 89.0, "step_nodes_per_layer": 153.0}]}, "md")
    assert "nodes/layer" in counted and "153.00" in counted
