# Session 4, call 4 (nvidia-h100-x2): kernel breakdown of a decode step at TP=1 and TP=2, then the GPU test suite.
source scripts/gpu_env.sh >/dev/null
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export ROLLOUT_GIT_COMMIT=$1 ROLLOUT_TWO_GPU_TIMEOUT_S=200
mkdir -p $OUT/r
SECONDS=0
for n in 1 2; do
OUT=$OUT/r timeout --kill-after=10 100 python3 -m torch.distributed.run --standalone --nproc-per-node $n .gl/prof_tp.py > $OUT/r/prof_tp$n.log 2>&1; echo "prof tp$n rc=$? at ${SECONDS}s"
grep -A1 "^TP=" $OUT/r/prof_tp$n.log
done
timeout --kill-after=10 330 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/test_triton_attention.py tests/test_triton_kernels.py --deselect tests/test_triton_kernels.py::test_kernels_in_interpreter > $OUT/r/gpu_tests.log 2>&1; echo "gpu tests rc=$? at ${SECONDS}s"; tail -2 $OUT/r/gpu_tests.log | cut -c1-300; grep -E "^(FAILED|ERROR)" $OUT/r/gpu_tests.log | head | cut -c1-300
