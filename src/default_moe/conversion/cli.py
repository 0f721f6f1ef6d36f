"""`default-moe convert SRC DST`: a MoE checkpoint (Mixtral, OLMoE, FlexOlmo, Qwen3-MoE, Qwen2-MoE) -> Default MoE,
or sparse upcycling of a dense model."""

import argparse

from .api import DTYPES, SOURCE_TYPES


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="output weight dtype (default: keep the source's)"
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB or 500MB (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists and is not empty")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="source checkpoint folder (or a Hub repo id)")
    parser.add_argument("dst", metavar="DST", help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument(
        "--from",
        dest="from_",
        choices=["auto", *SOURCE_TYPES],
        default="auto",
        help="source architecture (default: model_type in SRC/config.json)",
    )
    upcycling = parser.add_argument_group("upcycling (dense sources only)")
    upcycling.add_argument("--num-experts", type=int, help="experts per MoE layer (default 8)")
    upcycling.add_argument("--top-k", type=int, help="experts per token (default 2)")
    upcycling.add_argument("--granularity", type=int, help="split each dense MLP into G expert slices (default 1)")
    upcycling.add_argument("--num-dense-layers", type=int, help="keep the first N layers dense (default 0)")
    upcycling.add_argument(
        "--norm-topk-prob",
        type=_bool,
        metavar="BOOL",
        help="renormalise the top-k weights (default true: step 0 equals the dense model)",
    )
    upcycling.add_argument("--seed", type=int, default=0, help="router initialisation seed (default 0)")
    routing = parser.add_argument_group("Default MoE settings")
    routing.add_argument("--routing", choices=["default", "topk"], help="default (EMA defaults, the paper) or topk")
    routing.add_argument("--ema-beta", type=float, help="EMA decay of the defaults (default 0.9)")
    routing.add_argument("--ema-weighting", choices=["mean", "router_prob"], help="EMA statistic (default mean)")
    routing.add_argument(
        "--ema-update", choices=["before_use", "after_use"], help="EMA update order (default before_use)"
    )
    routing.add_argument(
        "--router-aux-loss-coef",
        type=float,
        help="Switch loss coefficient (default: the source's times top-k, or 0.01 when upcycling)",
    )
    calibration = parser.add_argument_group("calibration")
    calibration.add_argument("--calibration-data", metavar="FILE", help="text file to warm the EMA defaults on")
    calibration.add_argument(
        "--calibration-tokens", type=int, default=8192, metavar="N", help="tokens to use (default 8192)"
    )
    calibration.add_argument("--calibration-seq-len", type=int, default=256, help="sequence length (default 256)")
    parser.add_argument("--base-model", help="Hub id of the source, for the model card (default: SRC if a Hub id)")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from .api import convert

    out = convert(
        args.src,
        args.dst,
        from_=args.from_,
        num_experts=args.num_experts,
        top_k=args.top_k,
        granularity=args.granularity,
        num_dense_layers=args.num_dense_layers,
        norm_topk_prob=args.norm_topk_prob,
        seed=args.seed,
        routing=args.routing,
        ema_beta=args.ema_beta,
        ema_weighting=args.ema_weighting,
        ema_update=args.ema_update,
        router_aux_loss_coef=args.router_aux_loss_coef,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        calibration_data=args.calibration_data,
        calibration_tokens=args.calibration_tokens,
        calibration_seq_len=args.calibration_seq_len,
        base_model=args.base_model,
        overwrite=args.overwrite,
        progress=args.progress,
    )
    print(f"wrote {out}")
    return 0
