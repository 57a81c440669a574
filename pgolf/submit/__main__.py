"""`python -m pgolf.submit bundle RUN_DIR -o OUT [--pack]` and `python -m pgolf.submit record RUN_DIR [...] ...`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgolf.errors import PgolfError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pgolf.submit",
                                description="From finished runs to a Parameter Golf submission.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{bundle,record}")
    b = sub.add_parser("bundle", help="write one standalone train_gpt.py for a run's config")
    b.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (outputs/<run_id>) with config.yaml")
    b.add_argument("-o", "--out", required=True, metavar="OUT", help="the script to write (a folder: OUT/train_gpt.py)")
    b.add_argument("--pack", action="store_true", help="lzma+base85 the code inside a two-line stub (fewer bytes)")
    r = sub.add_parser("record", help="write a records/ submission folder from the seeds of one config",
                       description="Write README.md, submission.json, train_gpt.py and train_seed<SEED>.log into "
                       "OUT, after checking that every run finished, the runs differ only by seed, each trained "
                       "within the track's 600 s and each seed's model + code fits in 16,000,000 bytes. "
                       "Nothing is written when a check fails.")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="one finished run per seed")
    r.add_argument("--name", required=True, help="the submission's name")
    r.add_argument("--author", required=True, help="your name")
    r.add_argument("--github-id", required=True, help="your GitHub user name")
    r.add_argument("--blurb", help="one paragraph on what is new (default: a summary of the config)")
    r.add_argument("--pack", action="store_true", help="lzma-pack train_gpt.py (fewer code bytes)")
    r.add_argument("--allow-non-record", action="store_true",
                   help="write a non-record submission (runs over 600 s go to the unlimited-compute track); the "
                        "byte cap and the other checks still apply")
    r.add_argument("-o", "--out", required=True, metavar="OUT",
                   help="a new folder, e.g. records/track_10min_16mb/2026-03-21_MyRun")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "bundle":
            from pgolf.submit.bundle import write_bundle

            out = Path(args.out)
            out = out / "train_gpt.py" if out.is_dir() else out
            script = write_bundle(Path(args.run_dir), out, pack=args.pack)
            print(f"wrote {script} ({script.stat().st_size:,} bytes)")
            return 0
        from pgolf.submit.record import warnings_for, write_record

        sub = write_record(args.run_dirs, args.out, name=args.name, author=args.author, github_id=args.github_id,
                           blurb=args.blurb, pack=args.pack, allow_non_record=args.allow_non_record)
    except PgolfError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    for line in warnings_for(sub):
        print(f"warning: {line}", file=sys.stderr)
    std = "" if sub["val_bpb_std"] is None else f" (std {sub['val_bpb_std']:.5f})"
    print(f"wrote {args.out} [{sub['track']}]: val_bpb {sub['val_bpb']:.5f}{std} over seeds "
          f"{', '.join(map(str, sub['seeds']))}; bytes_total {sub['bytes_total']:,} (code {sub['bytes_code']:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
