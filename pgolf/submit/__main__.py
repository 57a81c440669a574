"""`python -m pgolf.submit bundle RUN_DIR -o OUT [--plain]`, `python -m pgolf.submit record RUN_DIR [...] ...` and
`python -m pgolf.submit code [OVERRIDE ...]` (a config's code bytes, before any run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgolf.errors import PgolfError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pgolf.submit",
                                description="From finished runs to a Parameter Golf submission.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{bundle,record,code}")
    b = sub.add_parser("bundle", help="write one standalone train_gpt.py for a run's config",
                       description="Write the run's code as the two-line self-extracting script a submission ships "
                       "and counts (minified, lzma, base85), or with --plain as readable source.")
    b.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (outputs/<run_id>) with config.yaml")
    b.add_argument("-o", "--out", required=True, metavar="OUT", help="the script to write (a folder: OUT/train_gpt.py)")
    b.add_argument("--plain", action="store_true", help="write the readable source instead of the counted script")
    c = sub.add_parser("code", help="print the code bytes a config's submission counts, and the parts it leaves out",
                       description="Compose the overrides as run.py does and print the bundle's bytes: readable, "
                       "minified, and counted (minified + lzma + base85 in two lines, what the 16,000,000-byte cap "
                       "sees). Nothing is written or trained.")
    c.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="as for run.py, e.g. experiment=smoke")
    r = sub.add_parser("record", help="write a records/ submission folder from the seeds of one config",
                       description="Write README.md, submission.json, train_gpt.py (the counted two-line script), "
                       "train_gpt_readable.py (the same code as source) and train_seed<SEED>.log into "
                       "OUT, after checking that every run finished, the runs differ only by seed, each trained "
                       "within the track's 600 s and each seed's model + code fits in 16,000,000 bytes. "
                       "Nothing is written when a check fails.")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="one finished run per seed")
    r.add_argument("--name", required=True, help="the submission's name")
    r.add_argument("--author", required=True, help="your name")
    r.add_argument("--github-id", required=True, help="your GitHub user name")
    r.add_argument("--blurb", help="one paragraph on what is new (default: a summary of the config)")
    r.add_argument("--plain", action="store_true",
                   help="ship the readable source as train_gpt.py and count all its bytes (no wrapped script)")
    r.add_argument("--allow-non-record", action="store_true",
                   help="write a non-record submission (runs over 600 s go to the unlimited-compute track); the "
                        "byte cap and the other checks still apply")
    r.add_argument("-o", "--out", required=True, metavar="OUT",
                   help="a new folder, e.g. records/track_10min_16mb/2026-03-21_MyRun")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "code":
            return print_code_bytes(args.overrides)
        if args.command == "bundle":
            from pgolf.submit.bundle import write_bundle

            out = Path(args.out)
            out = out / "train_gpt.py" if out.is_dir() else out
            script = write_bundle(Path(args.run_dir), out, plain=args.plain)
            print(f"wrote {script} ({script.stat().st_size:,} bytes)")
            return 0
        from pgolf.submit.record import warnings_for, write_record

        sub = write_record(args.run_dirs, args.out, name=args.name, author=args.author, github_id=args.github_id,
                           blurb=args.blurb, plain=args.plain, allow_non_record=args.allow_non_record)
    except PgolfError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    for line in warnings_for(sub):
        print(f"warning: {line}", file=sys.stderr)
    std = "" if sub["val_bpb_std"] is None else f" (std {sub['val_bpb_std']:.5f})"
    print(f"wrote {args.out} [{sub['track']}]: val_bpb {sub['val_bpb']:.5f}{std} over seeds "
          f"{', '.join(map(str, sub['seeds']))}; bytes_total {sub['bytes_total']:,} (code {sub['bytes_code']:,})")
    return 0


def print_code_bytes(overrides: list[str]) -> int:
    from pgolf.build import compose, to_container
    from pgolf.submit.bundle import bundle_config, minified_source, render, wrap
    from pgolf.submit.reach import left_out

    config = to_container(compose(overrides))
    readable, minified = render(config), minified_source(config)
    counted = wrap(minified)
    dropped = sorted(left_out(bundle_config(config))[0])
    print(f"code bytes for {' '.join(overrides) or 'the default config'}: readable {len(readable.encode()):,}, "
          f"minified {len(minified.encode()):,}, counted {len(counted.encode()):,} (minified + lzma + base85, "
          "the train_gpt.py a submission ships)")
    print(f"left out ({len(dropped)}, the config does not use them): {', '.join(dropped) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
