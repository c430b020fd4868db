"""ONNX Runtime sessions: the execution provider is chosen once per process, quietly.

onnxruntime-gpu lists the CUDA provider even where no GPU works; asking for it there prints a
page of errors and falls back. So the choice is made once, by building a one-node probe model on
CUDA with logging silenced and checking which provider the session really got.
"""

from __future__ import annotations

import functools
from pathlib import Path

import onnxruntime as ort

ort.set_default_logger_severity(3)


@functools.cache
def execution_providers() -> tuple[str, ...]:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return ("CPUExecutionProvider",)
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    try:
        session = ort.InferenceSession(onnx.SerializeToString(probe), _options(),
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - any failure means the GPU is not usable here
        return ("CPUExecutionProvider",)
    if "CUDAExecutionProvider" in session.get_providers():
        return ("CUDAExecutionProvider", "CPUExecutionProvider")
    return ("CPUExecutionProvider",)


def _options(threads: int = 0) -> ort.SessionOptions:
    """Quiet, and without spinning: ONNX Runtime's idle threads otherwise busy-wait after each run
    and starve the search kernel's threads (a top-k of microseconds then waits behind them). ``threads``
    per run (0: ONNX Runtime's default, one per physical core)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def new_session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), _options(threads), providers=list(execution_providers()))
