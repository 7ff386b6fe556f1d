#!/usr/bin/env bash
# Tensor parallelism on two GPUs of one host: decode-step of $MODEL (default qwen3-8b) at
# TP=1 (one process, GPU 0) and at TP=2 (torchrun, two processes, GPUs 0 and 1), each run in
# its own process with its own time limit (LIMIT, default 240 s), then the TP=2 / TP=1 tokens/s ratio per batch
# (the target: >= 1.6 for qwen3-8b). JSON results and logs go to $OUT (default
# benchmarks/results). Worst case ~8.5 min.
#   OUT=/some/dir bash benchmarks/run_gpu2.sh
# BATCHES (default 1,64,128): at TP=1 on an 80 GB H100, qwen3-8b's KV for B=256 at context
# 2048 (~85 GB) does not fit beside its 16 GB of weights; 128 (~43 GB) does.
# ARGS adds options to both runs (say ARGS=--enforce-eager). A dry run on CPU:
#   MODEL=tiny BATCHES=1,256 ARGS="--device cpu --scale 0.01" bash benchmarks/run_gpu2.sh
# (--scale must keep the batches distinct: 1,64,128 at 0.01 would all be 1, which is refused).
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/results}
PY=${PYTHON:-python}
MODEL=${MODEL:-qwen3-8b}
BATCHES=${BATCHES:-1,64,128}
LIMIT=${LIMIT:-240}  # seconds per run
read -r -a EXTRA <<< "${ARGS:-}"
# NVLink multicast off: on shared GPU hosts a program using it can take the GPUs down.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PYTHONUNBUFFERED=1  # torchrun's workers too: the logs keep up
mkdir -p "$OUT_DIR"
status=0

bench() {  # bench NAME TIME_LIMIT_S COMMAND... (COMMAND is given --out NAME.json)
    local name=$1 limit=$2
    shift 2
    echo "### $name: $*"
    timeout --kill-after=10 "$limit" "$@" --out "$OUT_DIR/$name.json" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    grep -v -e '^\[transformers\]' -e 'Warning' -e '^\*\*\*' -e 'OMP_NUM_THREADS' "$OUT_DIR/$name.log" | tail -n 15
    echo "### $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
CLI=(-m rollout.bench.cli decode-step --model "$MODEL" --batches "$BATCHES" ${EXTRA[@]+"${EXTRA[@]}"})
bench "decode-step-$MODEL-tp1" "$LIMIT" "$PY" -u "${CLI[@]}"
bench "decode-step-$MODEL-tp2" "$LIMIT" "$PY" -u -m torch.distributed.run --standalone --nproc-per-node 2 \
    "${CLI[@]}" --tensor-parallel-size 2
"$PY" - "$OUT_DIR/decode-step-$MODEL-tp1.json" "$OUT_DIR/decode-step-$MODEL-tp2.json" <<'EOF' || status=1
import json, sys
tp1, tp2 = (json.load(open(p)) for p in sys.argv[1:])
by_batch = {r["batch"]: r for r in tp1["rows"]}
print(f"\nTP=2 / TP=1 decode tokens/s ({tp2['model']}, {tp2['env']['gpu'] or tp2['env']['device']}); "
      f"target >= 1.6. roofline: the fraction of one GPU's roofline each step reaches")
print(" batch  tp1_tok_s  tp2_tok_s  ratio  tp1_roofline  tp2_roofline  steady")
for r in tp2["rows"]:
    one = by_batch.get(r["batch"])
    if one is None:
        continue
    print(f"{r['batch']:>6}  {one['tok_s']:>9.1f}  {r['tok_s']:>9.1f}  {r['tok_s'] / one['tok_s']:>5.2f}  "
          f"{one['roofline_fraction']:>12.3f}  {r['roofline_fraction']:>12.3f}  {one['steady'] and r['steady']}")
EOF
exit $status
