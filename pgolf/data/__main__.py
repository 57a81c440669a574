"""Command line: `python -m pgolf.data download ...` and `python -m pgolf.data prepare ...`.

A `PgolfError` prints as one `error: ...` line on stderr and exits with status 2, the same
status argparse uses for a bad argument, so scripts can tell user errors from crashes.
"""

from __future__ import annotations

import argparse
import sys

from pgolf.data.download import VARIANTS, download
from pgolf.data.prepare import NORMALIZATIONS, SOURCES, prepare
from pgolf.errors import PgolfError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pgolf.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    dl = sub.add_parser("download", help="fetch the challenge's published FineWeb shards and tokenizer")
    dl.add_argument("--variant", default="sp1024", help=f"tokenizer variant: {', '.join(VARIANTS)}")
    dl.add_argument("--train-shards", type=int, required=True, help="how many train shards (100M tokens each)")
    dl.add_argument("--root", default="data", help="local data root (default: data)")
    dl.add_argument("--with-docs", action="store_true", help="also fetch docs_selected.jsonl for re-tokenizing")
    dl.add_argument("--repo-id", default=None, help="Hugging Face dataset repo (default: the variant's)")
    dl.add_argument("--remote-root", default="datasets")

    pr = sub.add_parser("prepare", help="train a tokenizer and write shards from local documents")
    pr.add_argument("--source", required=True, choices=SOURCES)
    pr.add_argument("path", nargs="?", default=None, help="the .jsonl file, for --source jsonl")
    pr.add_argument("--vocab-size", type=int, default=1024)
    pr.add_argument("--out", required=True, help="output directory; must not exist or be empty")
    pr.add_argument("--val-docs", "--num-val-docs", dest="num_val_docs", type=int, default=50_000,
                    help="the first N documents form the val split (default 50,000, the challenge's)")
    pr.add_argument("--tokenizer-train-docs", type=int, default=5_000_000,
                    help="train the tokenizer on the first N whole documents (the challenge's 5,000,000); "
                         "0: on line chunks of the first ~400 MB, for sources of long documents such as code")
    pr.add_argument("--caseops", action="store_true", help="apply the CaseOps transform and write the byte sidecar")
    pr.add_argument("--normalization", default="nmt_nfkc", choices=NORMALIZATIONS,
                    help="nmt_nfkc (the challenge's, default) or identity (text kept byte for byte)")
    pr.add_argument("--shard-tokens", type=int, default=100_000_000, help="max tokens per shard (the challenge's 10^8)")
    pr.add_argument("--max-docs", type=int, default=None, help="use only the first N documents")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "download":
            result = download(
                variant=args.variant, train_shards=args.train_shards, root=args.root, with_docs=args.with_docs,
                repo_id=args.repo_id, remote_root=args.remote_root,
            )
            num = len(result["downloaded"])
            print(f"{result['dataset_dir']}: {num} files downloaded, tokenizer {result['tokenizer_paths'][0]}")
        else:
            m = prepare(
                source=args.source, path=args.path, vocab_size=args.vocab_size, out=args.out,
                num_val_docs=args.num_val_docs, shard_tokens=args.shard_tokens, max_docs=args.max_docs,
                normalization=args.normalization, caseops=args.caseops,
                tokenizer_train_docs=args.tokenizer_train_docs or None,
            )
            s = m["stats"]
            print(
                f"{args.out}: {s['docs_total']} docs ({s['docs_val']} val, {s['docs_train']} train), "
                f"{s['tokens_val']} val + {s['tokens_train']} train tokens, "
                f"{s['files_val']} val + {s['files_train']} train shards, "
                f"vocab {m['vocab_size']}, {m['elapsed_s']} s"
            )
    except PgolfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
