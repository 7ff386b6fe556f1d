# Session 5, call 2 (one H200): the fused-kernel GPU tests after the tolerance fix, decode-step with
# --enforce-eager (host time per step), rollout-long at full scale.
source scripts/gpu_env.sh
export ROLLOUT_GIT_COMMIT=$1
mkdir -p $OUT/r
SECONDS=0
timeout --kill-after=10 120 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py --deselect tests/test_triton_kernels.py::test_kernels_in_interpreter > $OUT/r/gpu_tests_kernels.log 2>&1; echo "kernel tests rc=$? at ${SECONDS}s"; tail -1 $OUT/r/gpu_tests_kernels.log; grep -E "^(FAILED|ERROR)" $OUT/r/gpu_tests_kernels.log | head | cut -c1-300
bench() { local name=$1 limit=$2; shift 2; timeout --kill-after=10 $limit python3 -u -m benchmarks.cli "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; echo "### $name rc=$? at ${SECONDS}s"; grep -v -e Warning -e '^\[transformers' -e warn $OUT/r/$name.log | tail -6 | cut -c1-300; }
bench decode-step-eager 100 decode-step --model qwen2.5-1.5b --enforce-eager
bench rollout-long 400 rollout-long --model qwen2.5-1.5b
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
