"""Photos in, measured: the pixel path (decode → backbone) against mirflickr25k's shipped
features of the same photos, in features and in retrieval quality; a frozen backbone against a
partly trained one; the ONNX photo encoder's speed against PyTorch eager; the size of a version
folder with the backbone inside.

    python bench/photos.py --photos DIR     # DIR: photos imN.jpg of mirflickr25k's first rows
    python bench/photos.py --small          # the 300 photos in data/mirflickr25k/photos, 1 seed

Quality: the rows whose photo is in DIR form a dataset twice, once with the shipped features
(float16, as data/mirflickr25k stores them) and once with the features the pixel path makes
(``images.decode_photo`` → ``backbone.PhotoBackbone``); each method of ``--methods`` runs
bench/quality.py's protocol on both (same stages, seeds, queries and epochs: 12 base labels then
4 + 4 + 4, 64 bits, a random tenth as queries), and the table gives pixel-path mAP minus
shipped-path mAP, mean ± sd over the seeds. Frozen or partly trained: the frozen backbone
against training its last fire module too, on 20 base labels then 4
(``backbone_variant_rows``). Speed: rows/s of ``image.onnx`` (uint8 pixels → code, one graph)
and of the same backbone + encoder in PyTorch eager, side by side at batch 1 and 64, one ONNX
Runtime thread (the service's) against two PyTorch threads. Writes bench/results/photos.json;
docs/images.md's tables are made from it.
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
from common import ROOT, write_result  # noqa: E402
from encoder_throughput import rows_per_second  # noqa: E402
from quality import Case, Job, run_jobs  # noqa: E402
from report import photos_tables  # noqa: E402

from lifelong_hashing.config import PhotoLimitsConfig  # noqa: E402
from lifelong_hashing.engine.backbone import photo_features, shared_backbone  # noqa: E402
from lifelong_hashing.engine.images import decode_photo  # noqa: E402
from lifelong_hashing.files import write_npz  # noqa: E402

MIRFLICKR = ROOT / "data" / "mirflickr25k"
BACKBONE = "squeezenet1_1"


def read_photos(photos: Path, rows: np.ndarray, image_ids: np.ndarray):
    """(pixels of the first 64 photos, features of all, seconds per photo of decode + backbone,
    fire8's maps of all: the input of a partly trained backbone)."""
    backbone = shared_backbone(BACKBONE)
    size = backbone.spec.input_size
    features = np.empty((len(rows), backbone.spec.dim), np.float32)
    maps = np.empty((len(rows), 512, 13, 13), np.float32)
    seconds = 0.0
    for at in range(0, len(rows), 64):
        chunk = rows[at:at + 64]
        start = time.perf_counter()
        pixels = np.stack([decode_photo((photos / f"im{image_ids[r]}.jpg").read_bytes(), size, PhotoLimitsConfig())
                           for r in chunk])
        features[at:at + len(chunk)] = photo_features(backbone, pixels)
        seconds += time.perf_counter() - start
        with torch.inference_mode():
            maps[at:at + len(chunk)] = backbone.feature_maps(torch.from_numpy(pixels), last="fire8").numpy()
        if at == 0:
            sample = pixels
    return sample, features, seconds / len(rows), maps


def feature_agreement(pixel: np.ndarray, shipped: np.ndarray) -> dict:
    cosine = (pixel * shipped).sum(1) / np.linalg.norm(pixel, axis=1) / np.linalg.norm(shipped, axis=1)
    return {"rows": len(pixel), "max_abs_diff_over_scale": float(np.abs(pixel - shipped).max() / np.abs(shipped).max()),
            "min_cosine": float(cosine.min())}


def subset_dataset(out: Path, rows: np.ndarray, image: np.ndarray) -> dict:
    """The rows as an npz dataset with ``image`` as its image side: params' dataset section."""
    data = np.load(MIRFLICKR / "mirflickr25k.npz")
    write_npz(out, {"ids": data["ids"][rows], "image": image, "text": data["text_tags_bow"][rows],
                    "labels": data["labels"][rows], "category_names": data["category_names"]})
    return {"kind": "npz", "path": str(out), "name": out.stem, "image_key": "image", "text_key": "text",
            "labels_key": "labels", "categories_key": "category_names", "ids_key": "ids", "split_key": None,
            "query_size": max(50, len(rows) // 10)}


def quality_rows(datasets: dict[str, dict], methods: list[str], seeds: int, epochs: int, jobs: int) -> list[dict]:
    grid = [Job(path, Case(dataset, base=12, per_stage=4, epochs=epochs, bits=(64,)), "a", 64, "labelled", seed,
                method, epochs, 1 if jobs > 1 else 2)
            for path, dataset in datasets.items() for method in methods for seed in range(seeds)]
    rows = []
    for _, found in run_jobs(grid, ("labels", "encoders"), jobs):
        for row in found:
            rows.append(row)
            print(f"{row['dataset']:8s} {row['method']:9s} seed {row['seed']} ({row['rule']}): "
                  f"I→T {row['i2t']:.4f} T→I {row['t2i']:.4f}")
    return rows


def backbone_variant_rows(datasets: dict[str, dict], seeds: int, epochs: int) -> list[dict]:
    """Frozen against partly trained: lifelong OrthoHash on 20 base labels then the last 4 (little
    lifelong effect to blur it), the same epochs and head; ``partial`` trains SqueezeNet's last
    fire module (from its ImageNet weights) on fire8's maps, ``frozen`` only the head on the
    backbone's features."""
    import copy

    from torch import nn

    from lifelong_hashing.config import load_params
    from lifelong_hashing.engine.encoders import mlp_body
    from lifelong_hashing.engine.runner import build_plan, history_summary, learn_stage
    from lifelong_hashing.engine.state import new_state

    out = []
    for variant, dataset in datasets.items():
        for seed in range(seeds):
            params = load_params(ROOT / "params.yaml", {
                "seed": seed, "dataset": dataset, "stages.base": 20, "stages.per_stage": 4, "train.epochs": epochs,
                "model.bits": 64, "model.image_encoder": "cnn" if variant == "partial" else "mlp",
                "eval": {"map_at": [], "precision_at": []}})
            plan = build_plan(params)
            first = plan.stages[0].batch
            state = new_state(params, first.image.shape[1:], first.text.shape[1])
            if variant == "partial":
                head, _ = mlp_body(512, params.model.hidden, params.model.dropout)
                fire9 = copy.deepcopy(shared_backbone(BACKBONE).fires["fire9"]).requires_grad_(True)
                state.method.image_net.body = nn.Sequential(fire9, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
            for stage in plan.stages:
                learn_stage(state, stage, plan.queries)
            summary = history_summary(state.history, state.timings)
            out.append({"variant": variant, "seed": seed, "i2t": round(summary["i2t"]["final_average_map"], 5),
                        "t2i": round(summary["t2i"]["final_average_map"], 5),
                        "train_seconds": round(summary["total_train_seconds"], 1)})
            print(f"{variant:8s} seed {seed}: I→T {out[-1]['i2t']:.4f} T→I {out[-1]['t2i']:.4f} "
                  f"{out[-1]['train_seconds']:.0f} s")
    return out


def speed_rows(version: Path, method, pixels: np.ndarray, seconds: float) -> list[dict]:
    from lifelong_hashing.inference.export import _PhotoEncoder
    from lifelong_hashing.inference.onnx_runtime import new_session

    session = new_session(version / "image.onnx", threads=1)
    eager_net = _PhotoEncoder(shared_backbone(BACKBONE), method.nets()["image"].cpu().eval()).eval()
    out = []
    for batch in (1, 64):
        x = pixels[np.arange(batch) % len(pixels)]
        xt = torch.as_tensor(x)

        def eager(xt=xt):
            with torch.inference_mode():
                eager_net(xt)

        torch_rate = rows_per_second(eager, batch, seconds)
        ort_rate = rows_per_second(lambda x=x: session.run(["bits"], {"pixels": x}), batch, seconds)
        out.append({"batch": batch, "torch_rows_per_s": round(torch_rate, 1), "torch_threads": torch.get_num_threads(),
                    "onnxruntime_rows_per_s": round(ort_rate, 1), "onnxruntime_threads": 1,
                    "ratio": round(ort_rate / torch_rate, 2)})
    return out


def photo_version(dataset: dict, photos: list[bytes], work: Path):
    """A photo model trained on the pixel-path dataset, published: (version folder, method)."""
    from lifelong_hashing.config import load_params
    from lifelong_hashing.engine.runner import run_sequence
    from lifelong_hashing.engine.state import load_state
    from lifelong_hashing.inference.export import publish

    params = load_params(ROOT / "params.yaml", {"dataset": dataset, "model.image_backbone": BACKBONE,
                                                "stages.base": 12, "stages.per_stage": 4, "train.epochs": 2,
                                                "train.lifelong_epochs": 1, "export.int8_min_agreement": None})
    run_sequence(params, work / "run", quiet=True)
    state = load_state(work / "run" / "state")
    state.photos = tuple(photos)
    return publish(state, work / "models", params.export), state.method


def folder_bytes(folder: Path) -> dict:
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    return {"total": sum(files.values()), **files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=Path, default=MIRFLICKR / "photos")
    ap.add_argument("--small", action="store_true", help="1 seed, 3 epochs")
    ap.add_argument("--methods", nargs="+", default=["orthohash", "joint", "finetune"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = np.load(MIRFLICKR / "mirflickr25k.npz")
    image_ids = data["image_ids"]
    rows = np.array([r for r in range(len(image_ids)) if (args.photos / f"im{image_ids[r]}.jpg").exists()])
    print(f"{len(rows)} photos in {args.photos}")
    sample, pixel, seconds_per_photo, maps = read_photos(args.photos, rows, image_ids)
    shipped = data["image_squeezenet"][rows].astype(np.float32)
    agreement = {**feature_agreement(pixel, shipped), "seconds_per_photo": round(seconds_per_photo, 4)}
    work = Path(tempfile.mkdtemp(prefix="lhash-photos-"))
    datasets = {"shipped": subset_dataset(work / "shipped.npz", rows, data["image_squeezenet"][rows]),
                "pixels": subset_dataset(work / "pixels.npz", rows, pixel)}
    seeds, epochs = (1, 3) if args.small else (args.seeds, 10)
    quality = quality_rows(datasets, args.methods, seeds, epochs, args.jobs)
    variants = backbone_variant_rows({"frozen": datasets["pixels"],
                                      "partial": subset_dataset(work / "fire8.npz", rows, maps)}, seeds, epochs)
    del maps
    files = [(args.photos / f"im{image_ids[r]}.jpg").read_bytes() for r in rows[:16]]
    version, method = photo_version(datasets["pixels"], files, work)
    result = {"photos": len(rows), "agreement": agreement, "quality": quality, "backbone_variants": variants,
              "speed": speed_rows(version, method, sample, args.seconds), "version_bytes": folder_bytes(version)}
    print(photos_tables(result))
    print(f"written to {write_result('photos_small' if args.small else 'photos', result)}")


if __name__ == "__main__":
    main()
