from rollout.compat.server_mode import NCCLTrainerSendWeightsArgs, NCCLWeightTransferEngine  # noqa: F401
