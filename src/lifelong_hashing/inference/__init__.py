"""Inference: ONNX export of a state's encoders as versioned model folders, the promotion pointer,
ONNX Runtime sessions, query-time retrieval and the HTTP service.

It may import the foundation and the engine. What serving loads (``versions``, ``onnx_runtime``,
``retrieval``, ``service``) imports no PyTorch; ``export`` (writing versions) does.
"""
