"""``mor data prepare SOURCE [--tokenizer T] [--out DIR] [key=value ...]``: tokenize a corpus.

Streams SOURCE (a .txt/.jsonl[.gz|.zst]/.parquet file, folder or glob, 'hf:NAME', or
'default') through the tokenizer into token shards and a manifest (``trainers.data``), in
parallel on the Ray cluster. Memory stays bounded whatever the corpus size; a killed
preparation continues where it stopped when run again. Train on the result with
``mor train data.source=DIR``. Overrides are fields of the data config, e.g.
``shard_tokens=8388608 prepare_workers=2 decode_errors=fail``.
"""

from __future__ import annotations

import argparse
import json
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    from cli.help import add_command

    example_lines = [
        "mor data prepare default",
        "mor data prepare corpus/*.jsonl.gz --out data/mycorpus vocab_size=8192",
        "mor data prepare hf:NAME --tokenizer tokenizer.json --json",
    ]
    description = "Tokenize a corpus into token shards.\n\n" + __doc__.split("\n\n", 1)[1].replace(
        "``", "`"
    )
    p = add_command(
        subparsers,
        "data",
        help="prepare a corpus into token shards (streamed, parallel on Ray, resumable)",
        description=description,
        example_lines=example_lines,
    )
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    q = add_command(
        sub,
        "prepare",
        help="tokenize SOURCE into shards",
        description=description,
        example_lines=example_lines,
    )
    q.add_argument("source", metavar="SOURCE", help="file, folder, glob, 'hf:NAME' or 'default'")
    q.add_argument("items", nargs="*", metavar="key=value", help="data config overrides")
    q.add_argument(
        "--tokenizer",
        help="tokenizer.json, a folder holding one, or a hub name "
        "(default: train a byte-level BPE of vocab_size on a sample)",
    )
    q.add_argument(
        "--out",
        metavar="DIR",
        help="output folder (default: the cache folder "
        "that `mor train` with the same data settings uses)",
    )
    q.add_argument(
        "--address",
        help="Ray cluster address (default: $RAY_ADDRESS, else the `mor up` stack, else local Ray)",
    )
    q.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    q.set_defaults(func=run, extra_dest="items")


def run(args: argparse.Namespace) -> int:
    from mor.overrides import apply_overrides, validate
    from trainers.data import DataConfig, prepare_data

    base = {"source": args.source}
    if args.tokenizer:
        base["tokenizer"] = args.tokenizer
    cfg = validate(DataConfig, apply_overrides(base, args.items), prefix="data.")
    start = time.perf_counter()
    data = prepare_data(cfg, out=args.out, address=args.address)
    seconds = time.perf_counter() - start
    tokens = data.num_train_tokens + data.num_val_tokens
    summary = {
        "dir": str(data.dir),
        "tokens": {"train": data.num_train_tokens, "val": data.num_val_tokens},
        "shards": {split: len(s) for split, s in data.shards.items()},
        "vocab_size": data.vocab_size,
        "skipped": data.skipped,
        "seconds": round(seconds, 2),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"[mor] data: {tokens:,} tokens ({data.num_train_tokens:,} train, "
        f"{data.num_val_tokens:,} val) in {summary['shards']['train']} + "
        f"{summary['shards']['val']} shards, vocab {data.vocab_size}, {seconds:.1f} s"
    )
    if any(data.skipped.values()):
        print(f"[mor] data: skipped {data.skipped}")
    print(f"[mor] data: {data.dir}")
    print(f"[mor] train on it: mor train data.source={data.dir}")
    return 0
