"""The engine: lifelong cross-modal hashing itself. Batches and datasets, category-incremental
stages, encoders, losses and the methods, the packed code store and its search, the metrics, the
state carried between stages and the runner that trains and evaluates a stage.

It may import the foundation (``config``, ``files``) and itself, nothing above: no ONNX, no
serving, no Prefect, Great Expectations, Evidently or DVC.
"""
