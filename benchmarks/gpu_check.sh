#!/usr/bin/env bash
# The CUDA checks, on one GPU, in under 8 minutes: the gpu tests (kernels and torch.compile on
# CUDA), then the language-model step and the embedding step, eager and compiled, with their
# figures printed (and written under bench-gpu/). Run from anywhere: bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench-gpu
mkdir -p "$out"
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device"
print(torch.__version__, torch.cuda.get_device_name(0))
PY
python -m pytest -q -p no:cacheprovider -m gpu tests
for mode in eager compile; do
  flag=$([ "$mode" = compile ] && echo --compile || true)
  python -m benchmarks.llm_new_tokens --device cuda --sizes 32k,128k --dims 1024 --rounds 20 --warmup 5 \
    --methods embconstraint,peft,floor $flag --out "$out/llm-$mode"
  python -m benchmarks.step_time --device cuda --sizes 100k,1M --dims 256 --pinned 90 \
    --methods embconstraint,peft,cat,free_only,full_table --rounds 1 --min-seconds 2 $flag --out "$out/step-$mode"
done
for f in "$out"/llm-*/llm_new_tokens.md "$out"/step-*/results.md; do
  echo "== $f"; cat "$f"
done
