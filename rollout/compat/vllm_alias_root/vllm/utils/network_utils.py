from rollout.compat.server_mode import get_ip  # noqa: F401
