"""ONNX export of a state's encoders, with a parity check that refuses a model that disagrees,
and ``publish``: the encoders and the code store as the next model version (``versions.py``).

Each encoder becomes one self-contained ONNX file (no external data) that takes raw features
(input normalization is inside), has a dynamic batch axis, and returns the continuous code and
its sign bits packed little-endian into K/8 bytes, the byte layout of ``codestore.pack_codes``.
A photo model's image encoder takes ``pixels`` instead, uint8 (n, 227, 227, 3) RGB as
``images.decode_photo`` makes them, with the frozen backbone inside the same graph; its parity
is checked on the state's real photos (``RunState.photos``) and their mirror images.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lifelong_hashing import __version__
from lifelong_hashing.config import ExportConfig, IndexConfig
from lifelong_hashing.engine.codestore import MODALITIES, pack_codes, words_from_bytes
from lifelong_hashing.engine.methods import Method
from lifelong_hashing.engine.state import RunState
from lifelong_hashing.files import atomic_write, write_json
from lifelong_hashing.inference.indexes import build_indexes
from lifelong_hashing.inference.versions import VersionError, list_versions, version_name, version_number, versions_dir

OPSET = 18


class ExportError(RuntimeError):
    pass


class _PackedEncoder(nn.Module):
    """encoder(x) → (code, packed sign bits): serving needs both and no post-processing."""

    def __init__(self, encoder: nn.Module, bits: int):
        super().__init__()
        self.encoder, self.bits = encoder, bits
        self.register_buffer("powers", 2.0 ** torch.arange(8, dtype=torch.float32))

    def forward(self, x: torch.Tensor):
        code = self.encoder(x)
        signs = (code > 0).to(torch.float32).reshape(-1, self.bits // 8, 8)
        return code, (signs * self.powers).sum(dim=-1).to(torch.uint8)


class _PhotoEncoder(nn.Module):
    """pixels → backbone features → the trained image encoder: one graph from photo to code."""

    def __init__(self, backbone: nn.Module, encoder: nn.Module):
        super().__init__()
        self.backbone, self.encoder = backbone, encoder

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.backbone(pixels))


def photo_backbone(method: Method, modality: str):
    """The backbone in front of ``modality``'s encoder, or None when it takes features."""
    name = method.params.model.image_backbone
    if modality != "image" or name == "none":
        return None
    from lifelong_hashing.engine.backbone import shared_backbone

    return shared_backbone(name)


def input_name(method: Method, modality: str) -> str:
    return "features" if photo_backbone(method, modality) is None else "pixels"


def vocabulary_hash(categories) -> str:
    return hashlib.sha256("\n".join(categories).encode()).hexdigest()[:16]


@dataclass
class Parity:
    max_abs_diff: float
    bit_agreement: float
    rows: int

    def as_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "bit_agreement": self.bit_agreement, "rows": self.rows}


def parity_inputs(method: Method, modality: str, rows: int = 256, seed: int = 0,
                  photos: tuple[bytes, ...] = ()) -> np.ndarray:
    """Inputs for the parity check: the memory's real exemplars when the method keeps some, topped
    up with draws from the encoder's own input statistics (|mean + std·noise|, like features).
    A photo encoder's: the real photos and their mirror images, or noise pixels without any."""
    backbone = photo_backbone(method, modality)
    if backbone is not None:
        return _parity_pixels(backbone.spec.input_size, photos, rows, seed)
    net = method.nets()[modality]
    shape = method.image_shape if modality == "image" else (method.text_dim,)
    mean, std = net.mean.cpu().numpy(), net.std.cpu().numpy()
    drawn = np.abs(mean + std * np.random.default_rng(seed).normal(size=(rows, *shape))).astype(np.float32)
    memory = getattr(method, "memory", None)
    if memory is None or len(memory) == 0:
        return drawn
    real = getattr(memory, modality)[:rows].astype(np.float32)
    return np.concatenate([real, drawn[: rows - len(real)]])


def _parity_pixels(size: int, photos: tuple[bytes, ...], rows: int, seed: int) -> np.ndarray:
    from lifelong_hashing.config import PhotoLimitsConfig
    from lifelong_hashing.engine.images import decode_photo

    if not photos:
        return np.random.default_rng(seed).integers(0, 256, (min(rows, 32), size, size, 3), dtype=np.uint8)
    real = np.stack([decode_photo(p, size, PhotoLimitsConfig()) for p in photos])
    return np.concatenate([real, real[:, :, ::-1]])[:rows]


def reference_codes(method: Method, modality: str, x: np.ndarray) -> np.ndarray:
    """What PyTorch gives for the ONNX graph's input: a photo through the backbone first."""
    backbone = photo_backbone(method, modality)
    if backbone is not None:
        from lifelong_hashing.engine.backbone import photo_features

        x = photo_features(backbone, x)
    return method.continuous(modality, x)


def export_encoder(method: Method, modality: str, path: Path, metadata: dict[str, str],
                   photos: tuple[bytes, ...] = ()) -> None:
    """Write one encoder to ``path`` (dynamo exporter, one file, dynamic batch)."""
    net = method.nets()[modality]
    net.eval()
    backbone = photo_backbone(method, modality)
    body = net.cpu() if backbone is None else _PhotoEncoder(backbone, net.cpu())
    wrapper = _PackedEncoder(body, method.bits).cpu().eval()
    example = torch.as_tensor(parity_inputs(method, modality, rows=4, photos=photos))
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    import onnx

    with warnings.catch_warnings(), quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, (example,), input_names=[input_name(method, modality)],
                                    output_names=["code", "bits"],
                                    dynamic_shapes={"x": {0: batch}}, opset_version=OPSET, dynamo=True,
                                    external_data=False, verbose=False)
    model = program.model_proto
    # The exporter's intermediate shape annotations can contradict ONNX's own inference (seen with
    # transposed weights), which breaks quantization tools; the runtime re-infers them anyway.
    del model.graph.value_info[:]
    # The exporter records each node's Python stack trace, with the absolute path of this source
    # tree: the same model exported from another checkout would differ in bytes (and in DVC hash).
    for node in [*model.graph.node, *(n for f in model.functions for n in f.node)]:
        del node.metadata_props[:]
        node.doc_string = ""
    _set_metadata(model, metadata)
    buffer = io.BytesIO()
    onnx.save_model(model, buffer)
    with atomic_write(path) as fh:
        fh.write(buffer.getvalue())
    net.to(method.device)


@contextlib.contextmanager
def quiet_exporter():
    """The dynamo exporter logs every pass at INFO; a user needs only the result."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def check_parity(method: Method, modality: str, onnx_path: Path, photos: tuple[bytes, ...] = ()) -> Parity:
    """ONNX Runtime against PyTorch on the same inputs: max |Δcode| and share of equal bits."""
    from lifelong_hashing.inference.onnx_runtime import new_session

    x = parity_inputs(method, modality, photos=photos)
    reference = reference_codes(method, modality, x)
    session = new_session(onnx_path)
    code, bits = session.run(None, {input_name(method, modality): x})
    if not np.array_equal(words_from_bytes(bits), pack_codes(code)):
        raise ExportError(f"{onnx_path.name}: packed bits output disagrees with the code output")
    agreement = float((np.sign(code) == np.sign(reference)).mean())
    return Parity(float(np.abs(code - reference).max()), agreement, len(x))


def quantize_int8(fp32_path: Path, int8_path: Path, method: Method, modality: str,
                  photos: tuple[bytes, ...] = ()) -> float:
    """Dynamic int8 quantization; returns the share of sign bits that agree with fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from lifelong_hashing.inference.onnx_runtime import new_session

    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # it warns on the root logger about pre-processing
    try:
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    x = {input_name(method, modality): parity_inputs(method, modality, photos=photos)}
    fp32 = new_session(fp32_path).run(["code"], x)[0]
    int8 = new_session(int8_path).run(["code"], x)[0]
    return float((np.sign(fp32) == np.sign(int8)).mean())


def encoder_input(method: Method, modality: str) -> dict:
    """The manifest's account of what an encoder takes: ``features`` (float32, shape) or
    ``pixels`` (uint8 height × width × 3 RGB, read by the named backbone)."""
    backbone = photo_backbone(method, modality)
    if backbone is None:
        shape = method.image_shape if modality == "image" else (method.text_dim,)
        return {"input": "features", "input_shape": list(shape)}
    size = backbone.spec.input_size
    return {"input": "pixels", "input_shape": [size, size, 3], "backbone": backbone.spec.name,
            "backbone_sha256": backbone.spec.converted_sha256}


def encoder_fingerprint(method: Method, modality: str) -> str:
    """What an exported encoder's graph is made from: its weights and buffers, its input, the code
    length, the backbone and the exporter's versions. An equal fingerprint gives the same graph,
    so a version can take the last one's file instead of exporting again (an append of known
    categories leaves the encoders as they were; bench/results/run_budget.json)."""
    import onnx

    digest = hashlib.sha256()
    for name, tensor in sorted(method.nets()[modality].state_dict().items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    backbone = photo_backbone(method, modality)
    digest.update(repr((OPSET, method.bits, input_name(method, modality), backbone.spec.name if backbone else None,
                        __version__, torch.__version__, onnx.__version__)).encode())
    return digest.hexdigest()


def reuse_encoder(previous: Path, modality: str, fingerprint: str, path: Path, metadata: dict[str, str]) -> bool:
    """Copy ``previous`` version's ``modality`` encoder to ``path`` with ``metadata`` when it was
    made from the same ``fingerprint``; False when there is none to reuse."""
    import onnx

    try:
        entry = json.loads((previous / "manifest.json").read_text())["encoders"][modality]
    except (OSError, ValueError, KeyError):
        return False
    if entry.get("fingerprint") != fingerprint or not (previous / entry["file"]).is_file():
        return False
    model = onnx.load_model(previous / entry["file"])
    del model.metadata_props[:]
    _set_metadata(model, metadata)
    with atomic_write(path) as fh:
        fh.write(model.SerializeToString())
    return True


def _set_metadata(model, metadata: dict[str, str]) -> None:
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)


def export_method(method: Method, out_dir: Path, *, model_version: str, int8_min_agreement: float | None,
                  photos: tuple[bytes, ...] = (), previous: Path | None = None) -> dict:
    """Export both encoders with parity (an error below 100 % bit agreement) and, if asked, int8
    copies that are kept only when their bit agreement reaches ``int8_min_agreement``. ``photos``:
    real photos to check a photo encoder's parity on. ``previous``: a version folder whose
    encoders are taken, not exported again, where their fingerprint is this method's."""
    metadata = {"project_version": __version__, "model_version": model_version, "bits": method.bits,
                "vocabulary_hash": vocabulary_hash(method.categories), "opset": OPSET}
    report: dict = {"opset": OPSET, "encoders": {}}
    for modality in MODALITIES:
        entry = encoder_input(method, modality)
        shape = entry["input_shape"]
        path = out_dir / f"{modality}.onnx"
        fingerprint = encoder_fingerprint(method, modality)
        own = {**metadata, "modality": modality, "input": entry["input"], "input_dim": "x".join(map(str, shape))}
        reused = previous is not None and reuse_encoder(previous, modality, fingerprint, path, own)
        if not reused:
            export_encoder(method, modality, path, own, photos)
        entry.update(fingerprint=fingerprint)
        parity = check_parity(method, modality, path, photos)
        if parity.bit_agreement < 1.0:
            path.unlink()
            raise ExportError(f"{modality} encoder: ONNX sign bits agree on {parity.bit_agreement:.4%} of "
                              f"{parity.rows} rows, not 100 % (max |diff| {parity.max_abs_diff:.3g})")
        entry.update(file=path.name, parity=parity.as_dict())
        if int8_min_agreement is not None:
            int8_path = out_dir / f"{modality}.int8.onnx"
            agreement = quantize_int8(path, int8_path, method, modality, photos)
            used = agreement >= int8_min_agreement
            if not used:
                int8_path.unlink()
            entry["int8"] = {"bit_agreement": agreement, "threshold": int8_min_agreement, "used": used,
                             **({"file": int8_path.name} if used else {})}
        report["encoders"][modality] = entry
    return report


def publish(state: RunState, models_dir: str | Path, cfg: ExportConfig, number: int | None = None,
            index: IndexConfig | None = None, previous: Path | None = None) -> Path:
    """Export a state's encoders and code store as version ``number`` (default: the next one),
    not yet promoted, with the approximate search ``index`` (``serving.index``) when not flat;
    encoders unchanged since version folder ``previous`` are taken from it."""
    root = versions_dir(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    existing = list_versions(models_dir)
    name = version_name(number if number is not None else version_number(existing[-1]) + 1 if existing else 1)
    if (root / name).exists():
        raise VersionError(f"{root / name} already exists")
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.tmp-"))
    try:
        report = export_method(state.method, tmp, model_version=name, int8_min_agreement=cfg.int8_min_agreement,
                               photos=state.photos, previous=previous)
        state.store.save(tmp / "codes.npz")
        if index is not None and index.kind != "flat":
            report["index"] = build_indexes(state.store, index, tmp)
        method = state.method
        manifest = {
            "version": name, "project_version": __version__,
            "method": method.name, "stage": method.stage, "bits": method.bits,
            "categories": list(method.categories), "vocabulary_hash": vocabulary_hash(method.categories),
            "database_size": len(state.store), **report,
            "text_vocabulary": state.text_vocabulary,
            **({"deleted_ids_sha256": sorted(state.deleted)} if state.deleted else {}),
        }
        write_json(tmp / "manifest.json", manifest)
        tmp.rename(root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / name
