"""Engines: what runs a decode step for a measurement.

- ``builtin`` (``fusedqk.engines.builtin``): fusedqk's own in-process Qwen3 decode on MLX, with
  the graph, composite and kernel paths installed side by side; the turn-paired instrument.
- command engines (``fusedqk.engines.command``): any engine driven through its command line,
  one fresh process per arm and round, defined by a YAML file (``config/engines/*.yaml``).
"""
