"""Prefect flows: thin orchestration over ``lifelong_hashing.operations.pipeline``."""
