"""Operations: what runs the engine as a product. Batch validation (Great Expectations),
monitoring (Evidently) and its code-health numbers, the git + DVC workspace that keeps every
version, and the pipeline steps the Prefect flows call.

It may import the foundation, the engine and inference; only the CLI and ``flows/`` sit above it.
"""
