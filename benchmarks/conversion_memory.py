"""Peak memory of `default-moe convert` (and `export`) on a synthetic Mixtral or Qwen3-MoE checkpoint of >= 1 GB.

Builds a sharded bfloat16 checkpoint in the original per-expert Hub layout (random weights, written shard by shard
with the safetensors library): Mixtral (8 experts, top-2) or Qwen3-MoE (128 experts, top-8, per-head q/k norms,
head_dim 128 != hidden/heads, as Qwen3-30B-A3B), then runs the conversion and the export back in fresh subprocesses.
Each child reports its own peak resident memory (`VmHWM` from /proc/self/status; `ru_maxrss` would include the
parent's size at fork) and its peak right after importing torch/transformers/default_moe, the "interpreter" floor; the
report sets the difference against the largest shard. The source is built in a subprocess of its own.

    python benchmarks/conversion_memory.py                       # ~1.2 GB Mixtral checkpoint, 300 MB shards
    python benchmarks/conversion_memory.py --source qwen3_moe    # ~1.3 GB Qwen3-MoE checkpoint, 300 MB shards
    python benchmarks/conversion_memory.py --quick               # ~40 MB, a few seconds
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import default_moe  # noqa: F401  (registers the classes, imports torch and transformers)
from default_moe.conversion import convert, export

def high_water_kb():  # VmHWM: this process's own peak RSS (ru_maxrss would include the parent's at fork)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

floor_kb = high_water_kb()
mode, src, dst, shard, model_type = sys.argv[1:6]
start = time.perf_counter()
if mode == "convert":
    convert(src, dst, max_shard_size=shard, progress=False)
else:
    export(src, dst, to=model_type, max_shard_size=shard, progress=False)
seconds = time.perf_counter() - start
print(json.dumps({"floor_kb": floor_kb, "peak_kb": high_water_kb(), "seconds": seconds}))
"""


def source_config(model_type: str, layers: int, hidden: int, width: int, experts: int, vocab: int):
    """The transformers config of the synthetic source."""
    from transformers import MixtralConfig, Qwen3MoeConfig

    if model_type == "mixtral":
        heads, kv_heads = hidden // 128, max(1, hidden // 512)
        return MixtralConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            num_local_experts=experts,
            num_experts_per_tok=2,
        )
    # Qwen3-30B-A3B's proportions: head_dim 128 with twice hidden/128 query heads, 4 key-value heads, top-8 of 128.
    return Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        moe_intermediate_size=width,
        num_hidden_layers=layers,
        num_attention_heads=2 * hidden // 128,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=experts,
        num_experts_per_tok=8,
        norm_topk_prob=True,
    )


def source_shapes(model_type: str, config) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the source in its original Hub names, in file order."""
    hidden, vocab = config.hidden_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    if model_type == "mixtral":
        block, names, width, experts = (
            "block_sparse_moe",
            ("w1", "w3", "w2"),
            config.intermediate_size,
            config.num_local_experts,
        )
    else:
        block, names, width, experts = (
            "mlp",
            ("gate_proj", "up_proj", "down_proj"),
            config.moe_intermediate_size,
            config.num_experts,
        )
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}"
        shapes += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.q_proj.weight", (q, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, q)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.{block}.gate.weight", (experts, hidden)),
        ]
        if model_type == "qwen3_moe":
            shapes += [(f"{p}.self_attn.q_norm.weight", (head_dim,)), (f"{p}.self_attn.k_norm.weight", (head_dim,))]
        for e in range(experts):
            x = f"{p}.{block}.experts.{e}"
            gate, up, down = names
            shapes += [
                (f"{x}.{gate}.weight", (width, hidden)),
                (f"{x}.{down}.weight", (hidden, width)),
                (f"{x}.{up}.weight", (width, hidden)),
            ]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def build_source(
    folder: Path, model_type: str, layers: int, hidden: int, width: int, experts: int, vocab: int, shard_bytes: int
) -> None:
    import torch
    from safetensors.torch import save_file

    config = source_config(model_type, layers, hidden, width, experts, vocab)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    config.dtype = "bfloat16"
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    shapes = source_shapes(model_type, config)

    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16) for name, shape in shard}
        save_file(tensors, folder / file_name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file_name)
        del tensors
    total = sum(2 * torch.Size(shape).numel() for _, shape in shapes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def run_child(mode: str, src: Path, dst: Path, shard: str, model_type: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(src), str(dst), shard, model_type], capture_output=True, text=True
    )
    if result.returncode:
        sys.exit(f"{mode} failed:\n{result.stderr}")
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    return stats


def largest_file(folder: Path) -> int:
    return max(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~40 MB checkpoint instead of ~1.2 GB")
    parser.add_argument(
        "--source", choices=["mixtral", "qwen3_moe"], default="mixtral", help="source architecture (default mixtral)"
    )
    parser.add_argument("--layers", type=int, help="decoder layers (default 6, or 2 with --quick)")
    parser.add_argument("--workdir", help="where to build the checkpoints (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--build", nargs=2, metavar=("DIR", "DIMS"), help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.build:
        build_source(Path(args.build[0]), **json.loads(args.build[1]))
        return
    # Mixtral: 8 experts of width 3584; Qwen3-MoE: 128 experts of width 256 (Qwen3-30B-A3B: 128 of 768, hidden 2048).
    width, experts = (3584, 8) if args.source == "mixtral" else (256, 128)
    if args.quick:
        dims = dict(layers=args.layers or 2, hidden=512, width=width // 4, experts=experts // 2, vocab=8000)
        dims |= dict(shard_bytes=6_000_000)
        out_shard = "6MB"
    else:
        dims = dict(layers=args.layers or 6, hidden=1024, width=width, experts=experts, vocab=32000)
        dims |= dict(shard_bytes=300_000_000)
        out_shard = "300MB"

    root = Path(args.workdir or tempfile.mkdtemp(prefix="default-moe-bench-"))
    src, dst, back = root / args.source, root / "default_moe", root / f"{args.source}_again"
    try:
        start = time.perf_counter()
        build = json.dumps(dims | {"model_type": args.source})
        subprocess.run([sys.executable, __file__, "--build", str(src), build], check=True)
        build_seconds = time.perf_counter() - start
        total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        convert_stats = run_child("convert", src, dst, out_shard, args.source)
        export_stats = run_child("export", dst, back, out_shard, args.source)
        mb = 1e6
        report = {
            "source": args.source,
            "experts": dims["experts"],
            "checkpoint_mb": round(total / mb, 1),
            "source_shards": len(list(src.glob("*.safetensors"))),
            "largest_source_shard_mb": round(largest_file(src) / mb, 1),
            "largest_output_shard_mb": round(largest_file(dst) / mb, 1),
            "build_seconds": round(build_seconds, 1),
        }
        for mode, stats in (("convert", convert_stats), ("export", export_stats)):
            peak, floor = stats["peak_kb"] * 1024 / mb, stats["floor_kb"] * 1024 / mb
            report[mode] = {
                "peak_rss_mb": round(peak, 1),
                "interpreter_floor_mb": round(floor, 1),
                "peak_above_floor_mb": round(peak - floor, 1),
                "above_floor_per_largest_source_shard": round((peak - floor) / (largest_file(src) / mb), 2),
                "seconds": round(stats["seconds"], 1),
            }
        print(json.dumps(report, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
