# Session 4, call 3 (nvidia-h100-x2): two-GPU tests incl. the symmetric all-reduce, then TP=1 vs TP=2 (symm) and TP=2 with NCCL only.
source scripts/gpu_env.sh >/dev/null
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export ROLLOUT_GIT_COMMIT=$1 ROLLOUT_TWO_GPU_TIMEOUT_S=300
mkdir -p $OUT/r
SECONDS=0
timeout --kill-after=10 330 python3 -m pytest -q -p no:cacheprovider -rA tests/gpu/test_two_gpus.py > $OUT/r/two_gpu_tests.log 2>&1; echo "two-gpu tests rc=$? in ${SECONDS}s"
tail -3 $OUT/r/two_gpu_tests.log | cut -c1-300; grep -E "^(FAILED|ERROR)|Error|assert|rank . " $OUT/r/two_gpu_tests.log | head -30 | cut -c1-400
SECONDS=0
OUT=$OUT/r PYTHON=python3 LIMIT=110 bash benchmarks/run_gpu2.sh 2>&1 | tail -6; echo "bench in ${SECONDS}s"
ROLLOUT_SYMM_ALL_REDUCE=0 timeout --kill-after=10 110 python3 -u -m torch.distributed.run --standalone --nproc-per-node 2 -m benchmarks.cli decode-step --model qwen3-8b --batches 1,64,128 --tensor-parallel-size 2 --out $OUT/r/decode-step-qwen3-8b-tp2-nccl.json > $OUT/r/decode-step-qwen3-8b-tp2-nccl.log 2>&1; echo "tp2 nccl rc=$?"
grep "fraction of roofline" $OUT/r/*.log
