# Session 4, call 5 (one H100): nano-bench on an empty Triton cache then warm, peer, rl-cycle on HEAD.
source scripts/gpu_env.sh >/dev/null
export ROLLOUT_GIT_COMMIT=$1
mkdir -p $OUT/r
rm -rf ~/.triton/cache
SECONDS=0
bench() { local name=$1 limit=$2; shift 2; timeout --kill-after=10 $limit python3 -u -m benchmarks.cli "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; echo "### $name rc=$? at ${SECONDS}s"; grep "fraction of roofline\|ratio\|floor" $OUT/r/$name.log | tail -3 | cut -c1-300; }
bench nano-bench-cold 60 nano-bench --model qwen3-0.6b
bench nano-bench-warm 45 nano-bench --model qwen3-0.6b
bench peer 110 peer --peer-workload nano-bench --model qwen3-0.6b --scale 0.5
bench rl-cycle 130 rl-cycle
for n in peer rl-cycle; do grep -v -e Warning -e '^\[transformers' $OUT/r/$n.log | tail -6 | cut -c1-250; done
