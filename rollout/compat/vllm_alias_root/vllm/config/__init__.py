from rollout.compat.vllm_config import (  # noqa: F401
    CacheConfig, CompilationConfig, CompilationLevel, CompilationMode, EngineConfig, LoRAConfig, ModelConfig,
    ParallelConfig, SchedulerConfig, VllmOptions,
)
