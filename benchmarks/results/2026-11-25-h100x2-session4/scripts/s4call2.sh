# Session 4, call 2 (nvidia-h100-x2): two-GPU tests with shutdown, then Qwen3-8B TP=1 vs TP=2 (no hang at exit?).
source scripts/gpu_env.sh >/dev/null
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export ROLLOUT_GIT_COMMIT=$1 ROLLOUT_TWO_GPU_TIMEOUT_S=300
mkdir -p $OUT/r
SECONDS=0
timeout --kill-after=10 330 python3 -m pytest -q -p no:cacheprovider -rA tests/gpu/test_two_gpus.py > $OUT/r/two_gpu_tests.log 2>&1; echo "two-gpu tests rc=$? in ${SECONDS}s"
tail -3 $OUT/r/two_gpu_tests.log | cut -c1-300; grep -E "^(FAILED|ERROR|PASSED)|Error|assert|rank . " $OUT/r/two_gpu_tests.log | head -40 | cut -c1-300
SECONDS=0
OUT=$OUT/r PYTHON=python3 LIMIT=110 bash benchmarks/run_gpu2.sh 2>&1 | tail -8; echo "bench in ${SECONDS}s"
