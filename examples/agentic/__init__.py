"""Multi-turn calculator-tool rollouts with asyncio agents: ``run.py``."""
