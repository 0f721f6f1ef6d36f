"""`default-moe export SRC DST --to mixtral|olmoe|flex_olmo|qwen3_moe|qwen2_moe`: a Default MoE checkpoint in the
original layout."""

import argparse

from .api import MOE_MODELS
from .cli import add_common_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="Default MoE checkpoint folder (or a Hub repo id)")
    parser.add_argument("dst", metavar="DST", help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument("--to", required=True, choices=list(MOE_MODELS), help="target architecture")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from .api import export

    out = export(
        args.src,
        args.dst,
        to=args.to,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        progress=args.progress,
    )
    print(f"wrote {out}")
    return 0
