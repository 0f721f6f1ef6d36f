"""Generation speed of the installed model vs transformers' Mixtral (grouped_mm), wall and CPU time.

    python -m benchmarks.generation_check [REPS]

Interleaved repetitions in one process; the generation row of BENCHMARKS.md (40 repetitions) comes from it.
"""

import sys

import torch

from default_moe import __file__ as package_file

from . import speed
from .common import interleaved_times, median


def main(reps: int = 8) -> None:
    torch.set_num_threads(1)
    print("default_moe from", package_file)
    s = speed.settings(False)
    models = speed._models(s, 8, 2, 256, torch.float32, ["default", "topk", "mixtral_grouped_mm"])
    prompt = speed._batch(s, 1)[:, :32]
    fns = {}
    for name, model in models.items():
        model.eval()
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = None

        def fn(model=model):
            with torch.no_grad():
                model.generate(prompt, max_new_tokens=48, min_new_tokens=48, do_sample=False)

        fns[name] = fn
    cpu: dict = {}
    wall = interleaved_times(fns, reps=reps, cpu_times=cpu)
    ref = "mixtral_grouped_mm"
    for name in wall:
        print(
            f"{name}: time / Mixtral wall {median(wall[name]) / median(wall[ref]):.3f}, "
            f"CPU {median(cpu[name]) / median(cpu[ref]):.3f}; {48 / median(cpu[name]):.1f} new tokens per CPU second"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
