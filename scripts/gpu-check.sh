#!/usr/bin/env bash
# Validate an install on a CUDA machine, the way users serve: CUDA graphs on, bfloat16.
#   1. the tests marked `gpu` (tests/engine/test_gpu.py): keep-all bit-identical to stock,
#      pruned Qwen tokens at their grid positions, selection inside vLLM's memory profile;
#   2. `vllm-promprune bench-select --device cuda` (selection cost and peak memory per method);
#   3. a short `vllm-promprune bench-serve` on the small offline LLaVA checkpoint.
# Without CUDA it stops at once: the gpu tests would only be skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "[gpu-check] torch sees no CUDA device: nothing to check here (the gpu tests skip without one)" >&2
  exit 1
fi
out=${GPU_CHECK_OUT:-.scratch/gpu-check}
mkdir -p "$out"
echo "[gpu-check] 1/3 tests marked gpu"
.venv/bin/python -m pytest -m gpu tests/engine/test_gpu.py -v -rs
echo "[gpu-check] 2/3 bench-select --device cuda"
.venv/bin/vllm-promprune bench-select --device cuda --quick | tee "$out/bench-select.txt"
.venv/bin/vllm-promprune bench-select --device cuda --memory | tee "$out/bench-select-memory.txt"
echo "[gpu-check] 3/3 bench-serve (short)"
.venv/bin/vllm-promprune bench-serve --budgets none 64 --methods promprune --concurrency 1 8 --out "$out/bench-serve"
echo "[gpu-check] done: results in $out"
