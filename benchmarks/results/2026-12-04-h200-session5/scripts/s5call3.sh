# Session 5, call 3 (one H200): the in-launch split merge (A/B in one process, bitwise, counters left zero),
# the GPU test suite, decode-step with a kernel profile, nano-bench; on the merged HEAD.
source scripts/gpu_env.sh
export ROLLOUT_GIT_COMMIT=$1
mkdir -p $OUT/r
SECONDS=0
timeout --kill-after=10 90 python3 .gl/ab_combine.py $OUT/r > $OUT/r/ab_combine.log 2>&1; echo "ab rc=$? at ${SECONDS}s"; cat $OUT/r/ab_combine.log | grep -v Warn | tail -8
timeout --kill-after=10 280 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/test_triton_attention.py tests/test_triton_kernels.py --deselect tests/test_triton_kernels.py::test_kernels_in_interpreter > $OUT/r/gpu_tests.log 2>&1; echo "gpu tests rc=$? at ${SECONDS}s"; tail -1 $OUT/r/gpu_tests.log | cut -c1-300; grep -E "^(FAILED|ERROR)" $OUT/r/gpu_tests.log | head | cut -c1-300
bench() { local name=$1 limit=$2; shift 2; timeout --kill-after=10 $limit python3 -u -m benchmarks.cli "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; echo "### $name rc=$? at ${SECONDS}s"; grep "fraction of roofline\|profile:" $OUT/r/$name.log | tail -4 | cut -c1-330; }
bench decode-step 100 decode-step --model qwen2.5-1.5b --profile-steps 10
bench nano-bench 60 nano-bench --model qwen3-0.6b
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
