"""ONNX Runtime against PyTorch eager for the exported encoders, side by side in one run: rows/s
at batch 1, 64 and 1,024 on real Wikipedia features. Writes bench/results/encoder_throughput.json.

    python bench/encoder_throughput.py [--state runs/wikipedia/state] [--seconds 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, models_dir_from_state, write_result  # noqa: E402
from report import encoder_table  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", type=Path, default=ROOT / "runs" / "wikipedia" / "state")
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    version = current_dir(models_dir_from_state(args.state, Path(tempfile.mkdtemp(prefix="lhash-enc-")) / "models"))
    method = load_state(args.state).method
    data = np.load(ROOT / "data" / "wikipedia" / "wikipedia.npz")
    rows = []
    print(f"torch threads {torch.get_num_threads()}, onnxruntime providers {list(execution_providers())}")
    for modality, key in FEATURE_KEYS.items():
        features = data[key].astype(np.float32)
        session = new_session(version / f"{modality}.onnx")
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
    print(f"written to {write_result('encoder_throughput', {'rows': rows})}")


if __name__ == "__main__":
    main()
