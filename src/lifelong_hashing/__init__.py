"""lifelong-hashing: deep lifelong cross-modal hashing (image↔text) with frozen database codes.

Layers, each importing only those below it (``tests/test_layers.py`` checks):

- ``config``, ``files``: the foundation (params, atomic byte-stable writes);
- ``engine``: batches, stages, methods, the code store, metrics, state, the runner;
- ``inference``: ONNX export, model versions, retrieval and the HTTP service;
- ``operations``: validation, monitoring, the git + DVC workspace, the pipeline steps;
- ``cli``: the ``lhash`` command (``flows/`` and ``serving/`` sit beside it, outside the package).
"""

__version__ = "0.1.0"
