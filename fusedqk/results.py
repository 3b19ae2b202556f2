"""What a measurement produces, whichever engine made it: a decode benchmark's settings and run,
the rule that ends its rounds, and an identity check's verdict and variety.

The built-in engine (``bench``, ``identity``), the command and server engines
(``external``) and the decision rule (``decide``) all use these; none of them imports
another's internals for them. The files each writes are stamped and checked by ``formats``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fusedqk.stats import Speedup


@dataclass(frozen=True)
class BenchSettings:
    prompt_tokens: int = 64
    generation_tokens: int = 128
    rounds: int = 15
    warmup: int = 2
    chunk_tokens: int = 16
    seed: int = 0
    # Adaptive length: after ``rounds`` rounds, go on until every fused path's speedup CI
    # half-width (relative) is at most ``target_half_width``, or ``max_rounds`` (default
    # 4 x ``rounds``) rounds ran, or the rounds took ``max_measure_s`` seconds (asv's
    # ``max_time``: a bounded run where the host's drift keeps the CI from narrowing).
    target_half_width: float | None = None
    max_rounds: int | None = None
    max_measure_s: float | None = None

    def round_limit_problem(self, spell: Callable[[str], str] = str) -> str | None:
        """What is wrong with the round settings, or None. ``spell`` writes a setting's name as
        the caller's interface spells it (a flag, a configuration key)."""
        if self.target_half_width is None:
            for limit in ("max_rounds", "max_measure_s"):
                if getattr(self, limit) is not None:
                    return (f"{spell(limit)}: only with {spell('target_half_width')} "
                            f"(otherwise {spell('rounds')} is the count)")
            return None
        if self.max_rounds is not None and self.max_rounds < self.rounds:
            return (f"{spell('max_rounds')} {self.max_rounds} is below {spell('rounds')} "
                    f"{self.rounds}; accepted: at least {spell('rounds')}")
        return None

    @property
    def round_limit(self) -> int:
        if self.target_half_width is None:
            return self.rounds
        return max(self.rounds, self.max_rounds or 4 * self.rounds)


@dataclass
class BenchRun:
    """A decode benchmark's raw samples and summaries (bench.json, trials.csv, tokens.csv)."""

    settings: BenchSettings
    paths: list[str]
    trials: list[dict] = field(default_factory=list)
    tokens: list[dict] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)
    speedups: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def stop_reason(s: BenchSettings, rounds_done: int, speedups: dict[str, Speedup],
                measured_s: float) -> str | None:
    """Why a benchmark stops after ``rounds_done`` rounds that took ``measured_s`` seconds, or
    None to run another."""
    if rounds_done < s.rounds:
        return None
    if s.target_half_width is None:
        return f"{s.rounds} rounds (fixed)"
    widest = max(sp.relative_half_width for sp in speedups.values())
    if widest <= s.target_half_width:
        return f"every speedup CI half-width <= {s.target_half_width:.2%} after {rounds_done} rounds"
    if rounds_done >= s.round_limit:
        return (f"max rounds {s.round_limit} reached with a CI half-width of {widest:.2%} "
                f"(target {s.target_half_width:.2%})")
    if s.max_measure_s is not None and measured_s >= s.max_measure_s:
        return (f"the {s.max_measure_s:g}-s measuring budget spent after {rounds_done} rounds "
                f"({measured_s:.0f} s) with a CI half-width of {widest:.2%} "
                f"(target {s.target_half_width:.2%})")
    return None


def first_divergence(a: list, b: list) -> int | None:
    """The first index where two sequences differ (the shorter one's length when one is a
    prefix of the other), or None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def verdict(comparison_equal: bool, graph_deterministic: bool | None,
            fused_deterministic: bool | None) -> str:
    """EQUAL, DIFFERS or INCONCLUSIVE from a comparison and its two determinism controls."""
    if graph_deterministic is None or fused_deterministic is None:
        return "INCONCLUSIVE"  # no controls: determinism unknown
    if comparison_equal and graph_deterministic and fused_deterministic:
        return "EQUAL"
    if not comparison_equal and graph_deterministic:
        return "DIFFERS"
    return "INCONCLUSIVE"


# Identity over greedy sequences this repetitive barely exercises the model: below this many
# distinct token ids in any of the graph path's greedy sequences, EQUAL is weak evidence and does
# not pass (docs/configuration.md, decision.min_distinct).
MIN_DISTINCT = 8


def fewest_distinct(result: dict | None) -> int | None:
    """The fewest distinct ids in any of the graph path's greedy sequences (None: not recorded)."""
    counts = (result or {}).get("graph_distinct_greedy_tokens")
    return min(counts) if counts else None


def variety_line(result: dict) -> str:
    """How varied an identity check's greedy sequences were, and whether that is too little."""
    counts = result.get("graph_distinct_greedy_tokens") or []
    weak = bool(counts) and min(counts) < MIN_DISTINCT
    return (f"  variety: {counts} distinct tokens per greedy sequence (graph)"
            + (f": WEAK EVIDENCE, below {MIN_DISTINCT}; the decision does not count it" if weak else ""))
