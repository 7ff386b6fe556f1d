#!/usr/bin/env bash
# A/B on one GPU, in one call: decode-step and nano-bench of a base checkout (BASE, a
# folder holding another commit's tree, e.g. `git archive <commit> | tar -x -C .base`) and of
# this checkout, alternating ROUNDS times so drift hits both alike. JSON and logs go to $OUT
# (default benchmarks/results), named {base,head}-{workload}-{round}.json; logs to $LOGS
# (default: beside them). FIRST_ROUND numbers the rounds of a second call.
#   BASE=.base ROUNDS=2 OUT=/some/dir bash benchmarks/run_ab.sh
set -u
cd "$(dirname "$0")/.."
HEAD_DIR=$PWD
BASE_DIR=$(cd "${BASE:?set BASE to the base checkout}" && pwd)
OUT_DIR=${OUT:-benchmarks/results}
PY=${PYTHON:-python}
LOG_DIR=${LOGS:-$OUT_DIR}
mkdir -p "$OUT_DIR" "$LOG_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG_DIR=$(cd "$LOG_DIR" && pwd)
status=0

cli_of() {  # the harness module of a checkout: rollout.bench since it moved into the package
    if [ -f "$1/rollout/bench/cli.py" ]; then echo rollout.bench.cli; else echo benchmarks.cli; fi
}

bench() {  # bench TAG DIR NAME TIME_LIMIT_S ARGS...
    local tag=$1 dir=$2 name=$3 limit=$4
    shift 4
    (cd "$dir" && PYTHONPATH="$dir:${EXTRA_PYTHONPATH:-}" timeout --kill-after=10 "$limit" \
        "$PY" -u -m "$(cli_of "$dir")" "$@" --out "$OUT_DIR/$tag-$name.json") >"$LOG_DIR/$tag-$name.log" 2>&1
    local rc=$?
    echo "### $tag $name: exit $rc"
    [ "$rc" -eq 0 ] || { tail -n 15 "$LOG_DIR/$tag-$name.log"; status=1; }
}

first=${FIRST_ROUND:-1}
for round in $(seq "$first" $((first + ${ROUNDS:-2} - 1))); do
    for side in base head; do
        dir=$BASE_DIR; [ "$side" = head ] && dir=$HEAD_DIR
        bench "$side" "$dir" "decode-step-$round" 120 decode-step --model qwen2.5-1.5b
        bench "$side" "$dir" "nano-bench-$round" 120 nano-bench --model qwen3-0.6b
    done
done
exit $status
