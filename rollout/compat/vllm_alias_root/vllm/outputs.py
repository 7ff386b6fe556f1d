from rollout.outputs import CompletionOutput, RequestOutput  # noqa: F401
