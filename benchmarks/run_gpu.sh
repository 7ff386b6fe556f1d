#!/usr/bin/env bash
# The standard benchmark set on one GPU, each workload in its own process (a fresh CUDA
# context and its own time limit, so one slow workload cannot eat the others' time).
# JSON results and logs go to $OUT (default benchmarks/results). Worst case ~7.5 min, 1.5 min
# more for each of EAGER=1 and COLD=1.
#   OUT=/some/dir bash benchmarks/run_gpu.sh
# PEER_SCALE / LONG_SCALE shrink the peer and rollout-long workloads (defaults below);
# EAGER=1 adds a decode-step run with --enforce-eager (host vs forward split under graphs);
# COLD=1 first runs nano-bench on an empty Triton cache (a fresh TRITON_CACHE_DIR: what the
# first rollout on a new machine pays for compiling kernels), as nano-bench-cold;
# PROFILE_STEPS=N adds decode-step's kernel profile of N more steps per batch.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/results}
PY=${PYTHON:-python}
mkdir -p "$OUT_DIR"
status=0

bench() {  # bench NAME TIME_LIMIT_S ARGS...
    local name=$1 limit=$2
    shift 2
    echo "### $name: rollout-bench $*"
    timeout --kill-after=10 "$limit" "$PY" -u -m rollout.bench.cli "$@" --out "$OUT_DIR/$name.json" \
        >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    grep -v -e '^\[transformers\]' -e 'Warning' "$OUT_DIR/$name.log" | tail -n 25
    echo "### $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if [ "${COLD:-0}" = 1 ]; then
    cold_cache=$(mktemp -d)
    TRITON_CACHE_DIR=$cold_cache bench nano-bench-cold 90 nano-bench --model qwen3-0.6b
    rm -rf "$cold_cache"
fi
bench decode-step 90 decode-step --model qwen2.5-1.5b --profile-steps "${PROFILE_STEPS:-0}"
bench nano-bench 90 nano-bench --model qwen3-0.6b
bench peer 100 peer --peer-workload nano-bench --model qwen3-0.6b --scale "${PEER_SCALE:-0.5}"
bench rollout-long 70 rollout-long --model qwen2.5-1.5b --scale "${LONG_SCALE:-0.125}"
bench rl-cycle 90 rl-cycle
if [ "${EAGER:-0}" = 1 ]; then
    bench decode-step-eager 90 decode-step --model qwen2.5-1.5b --enforce-eager
fi
exit $status
