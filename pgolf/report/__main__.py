"""`python -m pgolf.report MULTIRUN_DIR [...] [--baseline OVERRIDES] [--previous-top SPEC] [--metric KEY] [--out DIR]`,
or `python -m pgolf.report --against-log RECORD_LOG RUN_DIR [--out DIR]` (a run against its record's log)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgolf.errors import PgolfError
from pgolf.report.jobs import load_jobs
from pgolf.report.render import format_text, write_report
from pgolf.report.summary import BPB, summarize


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pgolf.report", description=__doc__.split("\n")[0].strip("`"))
    p.add_argument("dirs", nargs="+", metavar="MULTIRUN_DIR", help="Hydra multirun dirs; same overrides pool "
                   "(with --against-log: the one RUN_DIR)")
    p.add_argument("--against-log", metavar="RECORD_LOG", help="compare RUN_DIR's train.log with a record's "
                   "published train log: against_log.md/.json/.png with the first step they differ")
    p.add_argument("--tol-loss", type=float, default=0.05, help="train-loss tolerance for --against-log (nats)")
    p.add_argument("--tol-bpb", type=float, default=0.02, help="val_bpb tolerance for --against-log")
    p.add_argument("--baseline", help="comma-separated overrides of the baseline group, order-insensitive "
                   "(default: the group without overrides, else the first group by key)")
    p.add_argument("--previous-top", metavar="SPEC", help="the previous top row for PR #1902's rule (one-sided "
                   "Welch on val_bpb at p < 0.25): a record's submission.json, per-seed values "
                   "(1.05662,1.05611,1.05679) or a group's overrides (default: the baseline group)")
    p.add_argument("--metric", default=BPB, help=f"metrics.json key for the mean/std column and plot ({BPB})")
    p.add_argument("--out", help="where report.md/.json/.png go (default: the first MULTIRUN_DIR)")
    args = p.parse_args(argv)
    if args.against_log:
        return against_log(args)
    try:
        report = summarize(load_jobs(args.dirs), metric=args.metric, baseline=args.baseline,
                           previous_top=args.previous_top)
        out = Path(args.out or args.dirs[0])
        if out.exists() and not out.is_dir():
            raise PgolfError(f"--out {out} is a file, not a directory")
        written = write_report(report, out)
    except PgolfError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(format_text(report) + f"\nwrote {', '.join(str(w) for w in written)}")
    return 0


def against_log(args) -> int:
    from pgolf.report.against_log import compare_logs, format_markdown, write_against_log

    try:
        if len(args.dirs) != 1:
            raise PgolfError(f"--against-log takes one RUN_DIR, got {len(args.dirs)}: {' '.join(args.dirs)}")
        cmp = compare_logs(args.against_log, args.dirs[0], tol_loss=args.tol_loss, tol_bpb=args.tol_bpb)
        run = Path(args.dirs[0])
        written = write_against_log(cmp, Path(args.out) if args.out else run if run.is_dir() else run.parent)
    except PgolfError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(format_markdown(cmp).split("\n\n![")[0] + f"\nwrote {', '.join(str(w) for w in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
