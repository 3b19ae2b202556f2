"""The decision rule: from a run's speedups and identity verdicts to a per-backend default.

Per model and fused implementation:
  off           identity DIFFERS (under the ``exact`` policy), or the speedup CI's upper bound < 1
  on            identity EQUAL (or allowed by the policy) and the CI's lower bound >= 1 + min_gain
  inconclusive  otherwise, with the rounds that would likely decide it
Per implementation: off if any model is off, on if every model is on, else inconclusive.
Per backend: on with the implementation whose worst model gains most, if one is on; off if every
implementation is off; else inconclusive. The rule and its parameters go into every result.

The output is a defaults table (schema fusedqk-defaults/1) that FUSEDQK_DEFAULTS accepts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from fusedqk.archive import load_run
from fusedqk.results import MIN_DISTINCT, fewest_distinct
from fusedqk.stats import Speedup, rounds_to_decide
from fusedqk.toggle import DEFAULTS_SCHEMA

POLICIES = ("exact", "greedy-tokens")


@dataclass(frozen=True)
class Rule:
    min_gain: float = 0.01
    identity_policy: str = "exact"
    min_distinct: int = MIN_DISTINCT

    def describe(self) -> str:
        return (f"on when every model's identity verdict passes the '{self.identity_policy}' policy "
                f"on greedy sequences of at least {self.min_distinct} distinct tokens and its "
                f"speedup 95% CI lower bound >= {1 + self.min_gain:.3f}; off when any model's "
                "identity DIFFERS or its CI upper bound < 1; otherwise inconclusive")


# The most rounds a bench accepts (fusedqk bench --rounds, bench.max_rounds): beyond it a
# "rounds needed" figure is no advice.
MAX_USEFUL_ROUNDS = 10000


def identity_ok(result: dict | None, policy: str, min_distinct: int = 0) -> bool | None:
    """True/False when the identity result settles it under ``policy``; None when it cannot
    (including an EQUAL over sequences with fewer than ``min_distinct`` distinct ids)."""
    if result is None:
        return None
    v = result["verdict"]
    fewest = fewest_distinct(result)
    if v != "DIFFERS" and fewest is not None and fewest < min_distinct:
        return None
    if v == "EQUAL":
        return True
    if policy == "greedy-tokens" and result["free_running"]["identical"] and v != "INCONCLUSIVE":
        return True
    if v == "DIFFERS":
        return False
    return None


def decide_model(speedup: dict | None, ident: dict | None, rule: Rule) -> dict:
    if speedup is None:
        return {"recommendation": "inconclusive", "why": "no benchmark result"}
    s = Speedup(**{k: speedup[k] for k in ("point", "lo", "hi", "level", "p_value", "rounds")})
    ok = identity_ok(ident, rule.identity_policy, rule.min_distinct)
    ci = f"speedup {s.point:.3f} [{s.lo:.3f}, {s.hi:.3f}]"
    verdict = ident["verdict"] if ident else "not checked"
    fewest = fewest_distinct(ident)
    if ok is None and ident and fewest is not None and fewest < rule.min_distinct:
        verdict += (f" but weak evidence (a greedy sequence of {fewest} distinct tokens, below "
                    f"{rule.min_distinct})")
    if ok is False:
        return {"recommendation": "off", "why": f"identity {verdict}; {ci}"}
    if s.hi < 1:
        return {"recommendation": "off", "why": f"regresses: {ci} (upper bound < 1)"}
    if ok and s.lo >= 1 + rule.min_gain:
        return {"recommendation": "on", "why": f"identity {verdict}; {ci} >= {1 + rule.min_gain:.3f}"}
    if ok is None and s.lo >= 1 + rule.min_gain:
        # More rounds cannot help here: only deterministic controls (or a tolerance policy) can.
        return {"recommendation": "inconclusive", "rounds_needed": None,
                "why": f"identity {verdict}; the speed alone would say on ({ci} >= "
                       f"{1 + rule.min_gain:.3f}), more rounds do not change the identity result"}
    need = rounds_to_decide(s, rule.min_gain)
    more = ("the gain sits below the min-gain threshold; more rounds would not make it on"
            if need is None else
            f"more than {MAX_USEFUL_ROUNDS} rounds would be needed (now {s.rounds}): the point "
            "estimate sits too close to a threshold for its spread, so more rounds will not decide it"
            if need > MAX_USEFUL_ROUNDS else
            f"about {need} rounds (now {s.rounds}) would likely decide the speed")
    why = f"identity {verdict}; {ci}" if not ok else f"{ci} straddles the thresholds"
    return {"recommendation": "inconclusive", "why": f"{why}; {more}", "rounds_needed": need}


def decide(run_dir: Path, rule: Rule) -> dict:
    run = load_run(run_dir)
    impls = sorted({s["path"] for m in run.models.values() if m.bench for s in m.bench["speedups"]})
    per_impl = {}
    for impl in impls:
        models = {}
        for name, m in run.models.items():
            if m.failed:
                models[name] = {"recommendation": "inconclusive", "why": f"failed: {m.failed}"}
                continue
            sp = next((s for s in (m.bench or {}).get("speedups", []) if s["path"] == impl), None)
            models[name] = decide_model(sp, m.identity.get(impl), rule)
        recs = {r["recommendation"] for r in models.values()}
        rec = "off" if "off" in recs else "on" if recs == {"on"} else "inconclusive"
        worst = min((s["lo"] for m in run.models.values() if m.bench
                     for s in m.bench["speedups"] if s["path"] == impl), default=0.0)
        per_impl[impl] = {"recommendation": rec, "worst_ci_lower": worst, "models": models}
    on = [i for i, r in per_impl.items() if r["recommendation"] == "on"]
    if on:
        impl = max(on, key=lambda i: per_impl[i]["worst_ci_lower"])
        rec = "on"
    elif per_impl and all(r["recommendation"] == "off" for r in per_impl.values()):
        impl, rec = ("kernel" if "kernel" in per_impl else impls[0]), "off"
    else:
        impl, rec = ("kernel" if "kernel" in per_impl else (impls[0] if impls else "auto")), "inconclusive"
    if per_impl:
        reason = "; ".join(f"{m}: {r['why']}" for m, r in per_impl[impl]["models"].items())
    else:  # nothing was measured: the failures are the reason
        reason = "no speedup was measured; " + "; ".join(
            f"{name}: {'failed: ' + m.failed if m.failed else 'no benchmark result'}"
            for name, m in run.models.items())
    inert = _switch_inert_here(run)
    if inert:  # both arms ran the same code: whatever the rounds say is noise
        rec, reason = "inconclusive", f"{inert}; measured: {reason}"
    return {
        "schema": DEFAULTS_SCHEMA,
        "about": "fusedqk decide output; usable as FUSEDQK_DEFAULTS",
        "rule": {**asdict(rule), "text": rule.describe()},
        "backends": {run.backend: {
            "fused_qk_norm": rec == "on", "impl": impl, "recommendation": rec,
            "reason": f"{rec} ({impl}): {reason}", "evidence": str(run_dir),
            "device": run.environment.get("device_name"), "per_impl": per_impl,
        }},
    }


def _switch_inert_here(run) -> str | None:
    """Why the engine's switch does nothing on this run's backend, where its file says so
    (``toggle.backends``), else None."""
    for m in run.models.values():
        engine = ((m.bench or {}).get("meta") or {}).get("engine") or {}
        acts_on = engine.get("toggle_backends")
        if acts_on and run.backend not in acts_on:
            return (f"{engine.get('toggle')} acts on {', '.join(acts_on)} only: on {run.backend} "
                    "both arms run the same code, so no speedup here can turn it on")
    return None


def render_decisions(decisions: dict) -> str:
    rows = []
    for backend, d in decisions["backends"].items():
        for impl, r in d["per_impl"].items():
            for model, m in r["models"].items():
                rows.append({"backend": backend, "impl": impl, "model": model,
                             "recommendation": m["recommendation"], "why": m["why"]})
    head = [f"{b}: {d['recommendation'].upper()} (impl {d['impl']})"
            for b, d in decisions["backends"].items()]
    table = pd.DataFrame(rows).to_markdown(index=False) if rows else ""
    return "\n".join([*head, "", table, "", f"rule: {decisions['rule']['text']}"])
