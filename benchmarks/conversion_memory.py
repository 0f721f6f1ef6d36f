"""Peak memory of `default-moe convert` (and `export`) on a synthetic Mixtral checkpoint of >= 1 GB.

Builds a sharded bfloat16 Mixtral checkpoint in the original per-expert Hub layout (random weights, written shard by
shard with the safetensors library), then runs the conversion and the export back in fresh subprocesses. Each child
reports its own peak resident memory (`VmHWM` from /proc/self/status; `ru_maxrss` would include the parent's size at
fork) and its peak right after importing torch/transformers/default_moe, the "interpreter" floor; the report sets
the difference against the largest shard. The source is built in a subprocess of its own.

    python benchmarks/conversion_memory.py            # ~1.2 GB checkpoint, 300 MB shards
    python benchmarks/conversion_memory.py --quick    # ~40 MB, a few seconds
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
mode, src, dst, shard = sys.argv[1:5]
start = time.perf_counter()
if mode == "convert":
    convert(src, dst, max_shard_size=shard, progress=False)
else:
    export(src, dst, to="mixtral", max_shard_size=shard, progress=False)
seconds = time.perf_counter() - start
print(json.dumps({"floor_kb": floor_kb, "peak_kb": high_water_kb(), "seconds": seconds}))
"""


def build_source(
    folder: Path, layers: int, hidden: int, width: int, experts: int, vocab: int, shard_bytes: int
) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    heads, kv_heads = hidden // 128, max(1, hidden // 512)
    config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_local_experts=experts,
        num_experts_per_tok=2,
    )
    config.architectures = ["MixtralForCausalLM"]
    config.dtype = "bfloat16"
    folder.mkdir(parents=True)
    config.save_pretrained(folder)

    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    kv = kv_heads * hidden // heads
    for layer in range(layers):
        p = f"model.layers.{layer}"
        shapes += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.block_sparse_moe.gate.weight", (experts, hidden)),
        ]
        for e in range(experts):
            x = f"{p}.block_sparse_moe.experts.{e}"
            shapes += [
                (f"{x}.w1.weight", (width, hidden)),
                (f"{x}.w2.weight", (hidden, width)),
                (f"{x}.w3.weight", (width, hidden)),
            ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]

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


def run_child(mode: str, src: Path, dst: Path, shard: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(src), str(dst), shard], capture_output=True, text=True
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
    parser.add_argument("--layers", type=int, help="decoder layers (default 6, or 2 with --quick)")
    parser.add_argument("--workdir", help="where to build the checkpoints (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--build", nargs=2, metavar=("DIR", "DIMS"), help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.build:
        build_source(Path(args.build[0]), **json.loads(args.build[1]))
        return
    if args.quick:
        dims = dict(layers=args.layers or 2, hidden=512, width=896, experts=4, vocab=8000, shard_bytes=6_000_000)
        out_shard = "6MB"
    else:
        dims = dict(layers=args.layers or 6, hidden=1024, width=3584, experts=8, vocab=32000, shard_bytes=300_000_000)
        out_shard = "300MB"

    root = Path(args.workdir or tempfile.mkdtemp(prefix="default-moe-bench-"))
    src, dst, back = root / "mixtral", root / "default_moe", root / "mixtral_again"
    try:
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build", str(src), json.dumps(dims)], check=True)
        build_seconds = time.perf_counter() - start
        total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        convert_stats = run_child("convert", src, dst, out_shard)
        export_stats = run_child("export", dst, back, out_shard)
        mb = 1e6
        report = {
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
