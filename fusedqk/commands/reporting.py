"""Commands over finished runs: decide, aggregate, report, compare, failures, verify."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fusedqk.commands.flags import (
    MAX_TOKENS,
    count,
    number,
)
from fusedqk.errors import UserError


def cmd_decide(args: argparse.Namespace) -> int:
    from fusedqk import decide, formats
    from fusedqk.archive import refuse_sealed

    if args.out and Path(args.out).is_dir():
        raise UserError(f"--out {args.out!r} is a directory; name the decisions file")
    refuse_sealed(Path(args.out or Path(args.run_dir) / "decisions.json"), "--out" if args.out
                  else "decide", args.rewrite)
    rule = decide.Rule(min_gain=args.min_gain, identity_policy=args.identity_policy,
                       min_distinct=args.min_distinct)
    decisions = decide.decide(Path(args.run_dir), rule)
    formats.dump("decisions", decisions, Path(args.out or Path(args.run_dir) / "decisions.json"))
    print(decide.render_decisions(decisions))
    return 0


def cmd_aggregate(args: argparse.Namespace) -> int:
    from fusedqk import archive

    archive.refuse_sealed(Path(args.run_dir), "aggregate", args.rewrite)
    archive.aggregate(Path(args.run_dir))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fusedqk import report

    out = report.render_run(Path(args.from_dir), Path(args.out) if args.out else None,
                            rewrite=args.rewrite)
    print(f"wrote {', '.join(str(p) for p in out)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fusedqk import compare

    if args.index:
        if args.runs:
            raise UserError("compare: give run directories or --index RESULTS_DIR, not both")
        print(compare.index(Path(args.index), committed_only=args.committed), end="")
        return 0
    if args.committed:
        raise UserError("--committed: only with --index")
    if not args.runs:
        raise UserError("compare: name one or more archived run directories, or --index DIR")
    runs = [compare.summarize(Path(r)) for r in args.runs]
    print(compare.render_comparison(compare.compare(runs, args.by, args.mixed_workloads), args.output))
    return 0


def cmd_failures(args: argparse.Namespace) -> int:
    from fusedqk import archive

    failed = [f"{run}: {m.name}: {m.failed}" for run in args.run_dirs
              for m in archive.load_run(Path(run)).models.values() if m.failed]
    for line in failed:
        print(f"fusedqk: failed: {line}", file=sys.stderr)
    if failed:
        print(f"fusedqk: {len(failed)} model(s) failed; the report lists them and the run is "
              "sealed with what succeeded", file=sys.stderr)
    return 1 if failed else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from fusedqk import archive

    if args.write:
        if not Path(args.run_dir).is_dir():
            raise UserError(f"{args.run_dir}: no such run directory (verify --write seals an "
                            "existing run)")
        n = archive.write_manifest(Path(args.run_dir))
        print(f"wrote MANIFEST.sha256 ({n} files)")
        return 0
    problems = archive.verify(Path(args.run_dir))
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise UserError(f"{args.run_dir}: manifest check failed ({'; '.join(problems[:5])}{more})")
    print(f"{args.run_dir}: manifest OK")
    return 0



def add_parsers(sub) -> None:
    p = sub.add_parser("decide", help="apply the decision rule to a run directory")
    p.add_argument("run_dir")
    p.add_argument("--min-gain", type=number(float, 0.0, "a number", 1.0), default=0.01,
                   help="speedup CI lower bound must reach 1 + this (default 0.01)")
    p.add_argument("--identity-policy", default="exact", choices=("exact", "greedy-tokens"))
    p.add_argument("--min-distinct", type=count(MAX_TOKENS, low=0), default=8,
                   help="an identity check passes only over greedy sequences of at least this "
                        "many distinct tokens (default 8)")
    p.add_argument("--out", help="default: RUN_DIR/decisions.json")
    p.add_argument("--rewrite", action="store_true",
                   help="redo the decision of a sealed run (unseals it; seal again with verify --write)")
    p.set_defaults(func=cmd_decide)

    p = sub.add_parser("aggregate", help="tidy tables of every trial and summary in a run")
    p.add_argument("run_dir")
    p.add_argument("--rewrite", action="store_true",
                   help="redo a sealed run's tables (unseals it; seal again with verify --write)")
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("report", help="render report.md and report.html from a run's raw data")
    p.add_argument("--from", dest="from_dir", required=True, help="the run directory")
    p.add_argument("--out", help="output directory (default: the run directory, unless sealed)")
    p.add_argument("--rewrite", action="store_true",
                   help="re-render a sealed run in place once it verifies, and seal it again")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="archived runs side by side: speedups with CIs, what "
                       "each run was, where they disagree")
    p.add_argument("runs", nargs="*", help="sealed run directories")
    p.add_argument("--by", default="model", choices=("model", "device", "commit"),
                   help="how runs are ordered and labelled (default model: by date)")
    p.add_argument("-o", "--output", default="md", choices=("md", "csv", "json"))
    p.add_argument("--mixed-workloads", action="store_true",
                   help="put runs with different workloads in one table")
    p.add_argument("--index", metavar="RESULTS_DIR",
                   help="print the list of every run under RESULTS_DIR, marking those git does not "
                        "track as yours (results/README.md)")
    p.add_argument("--committed", action="store_true",
                   help="with --index: only the runs git tracks (how results/README.md is made)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("failures", help="name the models of finished runs that failed; exit 1 "
                       "if any did (the pipeline's last step)")
    p.add_argument("run_dirs", nargs="+")
    p.set_defaults(func=cmd_failures)

    p = sub.add_parser("verify", help="check (or --write) a run directory's MANIFEST.sha256")
    p.add_argument("run_dir")
    p.add_argument("--write", action="store_true")
    p.set_defaults(func=cmd_verify)
