"""ONNX Runtime against PyTorch eager for the exported encoders, side by side in one run: rows/s
at batch 1, 64 and 1,024 on real Wikipedia features, both on the service's encoder threads.
Writes bench/results/encoder_throughput.json.

Then each at batch 1,024 against this machine's matrix rate, measured in the same run (``matrix``
in the result): the same matrix products as the encoder's layers (no bias, activation or
normalization) and a 2,048² product, at 1 and at 2 threads, beside PyTorch eager, ONNX Runtime
as the service runs it (idle threads do not spin) and with ONNX Runtime's default spinning, and
the pipeline's append encoding (``Method.encode``: blocks of rows to packed codes). FLOPs are
PyTorch's count of the encoder's forward pass. The photo backbone (SqueezeNet v1.1 at 227 × 227,
``engine/backbone.py``) is measured the same way on 64 random photos, against the 2,048² product.

    python bench/encoder_throughput.py [--state runs/wikipedia/state] [--seconds 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, models_dir_from_state, write_result  # noqa: E402
from report import encoder_table, matrix_table  # noqa: E402

from lifelong_hashing.config import load_params  # noqa: E402
from lifelong_hashing.engine.state import load_state  # noqa: E402
from lifelong_hashing.inference.onnx_runtime import execution_providers, new_session  # noqa: E402
from lifelong_hashing.inference.versions import current_dir  # noqa: E402

FEATURE_KEYS = {"image": "image_sift_bovw", "text": "text_tfidf"}


def rows_per_second(fn, rows: int, seconds: float) -> float:
    fn()  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        done += rows
    return done / (time.perf_counter() - start)


THREADS = (1, 2)


def flops_per_row(net: nn.Module, row: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(row)
    return counter.get_total_flops()


def square_gemm_flops(seconds: float, size: int = 2048) -> float:
    """FLOP/s of one large fp32 matrix product: the machine's matrix rate at the current threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return rows_per_second(lambda: torch.mm(a, b), 1, seconds) * 2 * size ** 3


def matrix_rows(modality: str, method, version: Path, features: np.ndarray, seconds: float) -> list[dict]:
    """One encoder at batch 1,024 against the matrix products of its own layers, per thread count."""
    net = method.nets()[modality].eval()
    x = np.ascontiguousarray(features[np.arange(1024) % len(features)])
    xt = torch.as_tensor(x)
    flops = flops_per_row(net, xt[:1])
    weights = [m.weight.detach().T.contiguous() for m in net.modules() if isinstance(m, nn.Linear)]

    def layers_only():
        h = xt
        for w in weights:
            h = torch.mm(h, w)

    def eager():
        with torch.inference_mode():
            net(xt)

    rows = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        spinning = ort.SessionOptions()
        spinning.intra_op_num_threads = threads
        served = new_session(version / f"{modality}.onnx", threads)
        default = ort.InferenceSession(str(version / f"{modality}.onnx"), spinning,
                                       providers=list(execution_providers()))
        rates = {"same products": rows_per_second(layers_only, 1024, seconds) * flops,
                 "PyTorch eager": rows_per_second(eager, 1024, seconds) * flops,
                 "ONNX Runtime, served": rows_per_second(lambda s=served: s.run(["bits"], {"features": x}), 1024,
                                                        seconds) * flops,
                 "ONNX Runtime, spinning": rows_per_second(lambda s=default: s.run(["bits"], {"features": x}),
                                                          1024, seconds) * flops,
                 "append encoding": rows_per_second(lambda: method.encode(modality, x), 1024, seconds) * flops}
        rows.append(matrix_row(modality, threads, flops, rates, square_gemm_flops(seconds)))
    return rows


def matrix_row(name: str, threads: int, flops: int, rates: dict, square: float) -> dict:
    reference = rates.get("same products", square)
    return {"encoder": name, "threads": threads, "mflop_per_row": round(flops / 1e6, 3),
            "gflop_per_s": {k: round(v / 1e9, 1) for k, v in {**rates, "2048² product": square}.items()},
            "of_matrix_rate": {k: round(v / reference, 3) for k, v in rates.items() if k != "same products"}}


def backbone_rows(seconds: float, work: Path) -> list[dict]:
    """The photo backbone on 64 random photos against the 2,048² product: PyTorch eager (how the
    pipeline makes photo features) and ONNX Runtime (the graph the exported image encoder holds)."""
    from lifelong_hashing.engine.backbone import shared_backbone
    from lifelong_hashing.inference.export import quiet_exporter

    backbone = shared_backbone("squeezenet1_1")
    pixels = torch.as_tensor(np.random.default_rng(0).integers(0, 256, (64, 227, 227, 3), dtype=np.uint8))
    flops = flops_per_row(backbone, pixels[:1])
    path = work / "backbone.onnx"
    with quiet_exporter():
        torch.onnx.export(backbone, (pixels[:2],), path, dynamo=True,
                          dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}})
    rows = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        served = new_session(path, threads)
        name = served.get_inputs()[0].name

        def eager():
            with torch.inference_mode():
                backbone(pixels)

        feed = {name: pixels.numpy()}
        rates = {"PyTorch eager": rows_per_second(eager, len(pixels), seconds) * flops,
                 "ONNX Runtime, served": rows_per_second(lambda s=served, feed=feed: s.run(None, feed), len(pixels),
                                                        seconds) * flops}
        rows.append(matrix_row("photo backbone", threads, flops, rates, square_gemm_flops(seconds)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", type=Path, default=ROOT / "runs" / "wikipedia" / "state")
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    version = current_dir(models_dir_from_state(args.state, Path(tempfile.mkdtemp(prefix="lhash-enc-")) / "models"))
    method = load_state(args.state).method
    data = np.load(ROOT / "data" / "wikipedia" / "wikipedia.npz")
    rows = []
    threads = load_params(ROOT / "params.yaml").serving.encoder_threads or torch.get_num_threads()
    torch.set_num_threads(threads)  # the service's encoder threads, for both
    print(f"threads {threads} (serving.encoder_threads), onnxruntime providers {list(execution_providers())}")
    for modality, key in FEATURE_KEYS.items():
        features = data[key].astype(np.float32)
        session = new_session(version / f"{modality}.onnx", threads)
        net = method.nets()[modality].eval()
        for batch in (1, 64, 1024):
            x = features[np.arange(batch) % len(features)]
            xt = torch.as_tensor(x)

            def eager(net=net, xt=xt):
                with torch.inference_mode():
                    net(xt)

            torch_rate = rows_per_second(eager, batch, args.seconds)
            ort_rate = rows_per_second(lambda s=session, x=x: s.run(["bits"], {"features": x}), batch, args.seconds)
            rows.append({"encoder": modality, "batch": batch, "torch_rows_per_s": round(torch_rate),
                         "onnxruntime_rows_per_s": round(ort_rate), "ratio": round(ort_rate / torch_rate, 2)})
    print(encoder_table(rows))
    matrix = [row for modality, key in FEATURE_KEYS.items()
              for row in matrix_rows(modality, method, version, data[key].astype(np.float32), args.seconds)]
    matrix += backbone_rows(args.seconds, version.parent)
    print("\n" + matrix_table(matrix))
    print(f"written to {write_result('encoder_throughput', {'rows': rows, 'matrix': matrix})}")


if __name__ == "__main__":
    main()
