# Session 4, call 1 (nvidia-h100-x2): two-GPU tests, then Qwen3-8B decode TP=1 vs TP=2.
source scripts/gpu_env.sh >/dev/null
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export ROLLOUT_GIT_COMMIT=$1
mkdir -p $OUT/r
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nvidia-smi topo -m | head -4
timeout --kill-after=10 210 python3 -m pytest -q -p no:cacheprovider -rA tests/gpu/test_two_gpus.py > $OUT/r/two_gpu_tests.log 2>&1; echo "two-gpu tests rc=$?"
tail -3 $OUT/r/two_gpu_tests.log | cut -c1-300; grep -E "^(FAILED|ERROR|PASSED)|Error|assert" $OUT/r/two_gpu_tests.log | head -20 | cut -c1-300
OUT=$OUT/r PYTHON=python3 LIMIT=165 bash benchmarks/run_gpu2.sh 2>&1 | tail -14
