from rollout.outputs import Logprob  # noqa: F401
