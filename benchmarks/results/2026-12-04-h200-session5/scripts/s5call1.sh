# Session 5, call 1 (one H200): GPU test suite (first run of the fused rotary/q-k-norm/K-V-write kernels
# and the sampler BLOCK_S), nano-bench cold then warm, decode-step Qwen2.5-1.5B with a kernel profile, peer.
source scripts/gpu_env.sh
export ROLLOUT_GIT_COMMIT=$1
mkdir -p $OUT/r
rm -rf ~/.triton/cache
SECONDS=0
timeout --kill-after=10 200 python3 -m pytest -q -p no:cacheprovider -x -k "rotary or sampl" tests/gpu tests/test_triton_kernels.py --deselect tests/test_triton_kernels.py::test_kernels_in_interpreter > $OUT/r/gpu_tests_fused.log 2>&1; echo "fused tests rc=$? at ${SECONDS}s"; tail -1 $OUT/r/gpu_tests_fused.log
bench() { local name=$1 limit=$2; shift 2; timeout --kill-after=10 $limit python3 -u -m benchmarks.cli "$@" --out $OUT/r/$name.json > $OUT/r/$name.log 2>&1; echo "### $name rc=$? at ${SECONDS}s"; grep "fraction of roofline\|ratio\|ceiling" $OUT/r/$name.log | tail -4 | cut -c1-300; }
bench nano-bench-cold 60 nano-bench --model qwen3-0.6b
bench nano-bench-warm 45 nano-bench --model qwen3-0.6b
bench decode-step 100 decode-step --model qwen2.5-1.5b --profile-steps 10
grep -A30 "profile" $OUT/r/decode-step.log | head -60 | cut -c1-200
bench peer 110 peer --peer-workload nano-bench --model qwen3-0.6b --scale 0.5
timeout --kill-after=10 260 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/test_triton_attention.py tests/test_triton_kernels.py --deselect tests/test_triton_kernels.py::test_kernels_in_interpreter > $OUT/r/gpu_tests.log 2>&1; echo "gpu tests rc=$? at ${SECONDS}s"; tail -2 $OUT/r/gpu_tests.log | cut -c1-300; grep -E "^(FAILED|ERROR)" $OUT/r/gpu_tests.log | head | cut -c1-300
tar czf $OUT/r.tgz -C $OUT r && rm -rf $OUT/r
