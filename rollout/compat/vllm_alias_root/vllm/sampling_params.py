from rollout.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams  # noqa: F401

# vLLM's older name of StructuredOutputsParams.
GuidedDecodingParams = StructuredOutputsParams
