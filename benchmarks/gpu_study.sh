#!/usr/bin/env bash
# Issue 19's study on one GPU (bf16): top-K and the paper's form at 25M, 98M and 393M parameters (8 experts top-1,
# 32,768 tokens per step, each arm's own 3-rate grid, widened past an edge where its best sits, then seeds 1-2 at
# its best; benchmarks/study.py, plan "gpu"),
# four runs at a time on the one GPU, no run started after DEADLINE seconds (default 420), then the tables and plot.
#
# Prepare, once, in the checkout the device tool sends (the device's own transformers, 5.17, is below our floor):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl transformers==5.20.2 regex==2026.11.19
# Run (the device tool): command "bash benchmarks/gpu_study.sh", carry [".whl"], timeout_s 540. What it writes under
# $OUT comes back: study_gpu.jsonl (one line per finished run), study_gpu.md (the tables), study_gpu_gap.png.
# On a CPU, `QUICK=1 bash benchmarks/gpu_study.sh` runs the same script at tiny sizes (the quick plan, fp32; the
# bf16 run itself is tested on the CPU by tests/benchmarks/test_quick.py).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/study_gpu}"
mkdir -p "$out"
# Resume: the runs already in the committed results file are skipped (a new run appends to the copy under $out).
if [ -z "${QUICK:-}" ] && [ -f benchmarks/results/study_gpu.jsonl ] && [ ! -f "$out/study_gpu.jsonl" ]; then
  cp benchmarks/results/study_gpu.jsonl "$out/study_gpu.jsonl"
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
if [ -n "${QUICK:-}" ]; then
  plan=(--quick) kind=quick
else
  plan=(--device cuda --jobs 4) kind=gpu
  nvidia-smi --query-gpu=name,memory.total --format=csv
fi
python3 -m benchmarks --only study "${plan[@]}" --deadline "${DEADLINE:-420}" --results "$out/study_gpu.jsonl" 2>&1 |
  grep -v Warning | tee "$out/study_gpu.log"
python3 -m benchmarks.study_report "$out/study_gpu.jsonl" --kind "$kind" --plot "$out/study_gpu_gap.png" > "$out/study_gpu.md"
tail -n 30 "$out/study_gpu.md"
