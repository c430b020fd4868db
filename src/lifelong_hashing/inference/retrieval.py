"""Query-time retrieval on a published model version: ONNX encoders + the packed code store.

No PyTorch and no float matrix products at query time: queries go through ONNX Runtime to packed
bits, and the database is searched by Hamming distance in the code store.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lifelong_hashing.config import PhotoLimitsConfig
from lifelong_hashing.engine.batch import shown
from lifelong_hashing.engine.codestore import MODALITIES, CodeStore, CodeStoreError, ItemFilter, words_from_bytes
from lifelong_hashing.engine.images import PhotoError, decode_photo
from lifelong_hashing.inference.indexes import load_indexes, search_index
from lifelong_hashing.inference.onnx_runtime import execution_providers, new_session


class QueryError(ValueError):
    """A query that cannot be answered as sent; the message says why (HTTP 422)."""


class ModelLoadError(RuntimeError):
    pass


def _listed(words: list[str]) -> str:
    """The first few words of a query for a message, each cut short."""
    more = f" and {len(words) - 10:,} more" if len(words) > 10 else ""
    return "[" + ", ".join(shown(w, 40) for w in words[:10]) + "]" + more


class TextVocabulary:
    """Words → the text features the model was trained on (counts, × idf, optional L2 norm)."""

    def __init__(self, words: list[str], idf: list[float] | None, l2_normalize: bool):
        self.index = {w: i for i, w in enumerate(words)}
        self.idf = np.asarray(idf, np.float32) if idf is not None else None
        self.l2_normalize, self.size = l2_normalize, len(words)

    def vectorize(self, queries: list[list[str]]) -> np.ndarray:
        out = np.zeros((len(queries), self.size), np.float32)
        for row, words in enumerate(queries):
            known = [self.index[w] for w in words if w in self.index]
            if not known:
                raise QueryError(f"query {row}: none of the words {_listed(words)} is in the model's text vocabulary")
            np.add.at(out[row], known, 1.0)
        if self.idf is not None:
            out *= self.idf
        weightless = np.flatnonzero(~out.any(axis=1))
        if weightless.size:
            row = int(weightless[0])
            raise QueryError(f"query {row}: the words {_listed(queries[row])} carry no weight (idf 0: they occur in "
                             "every training text), so the query has no direction to search in")
        if self.l2_normalize:
            out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out


class RetrievalModel:
    """One exported version, loaded for queries. ``encoder_threads``: ONNX Runtime threads per
    encoder run (0: one per core; the service runs one and serves requests side by side).
    ``photo_limits``: what a photo query may cost (params ``photos``), for a version whose image
    encoder takes photos."""

    def __init__(self, version_dir: str | Path, encoder_threads: int = 0,
                 photo_limits: PhotoLimitsConfig | None = None):
        self.path = Path(version_dir)
        self.photo_limits = photo_limits or PhotoLimitsConfig()
        try:
            self.manifest = json.loads((self.path / "manifest.json").read_text())
            self.store = CodeStore.load(self.path / "codes.npz")
            encoders = self.manifest["encoders"]
            self.sessions = {m: new_session(self.path / encoders[m].get("int8", {}).get("file", encoders[m]["file"]),
                                            encoder_threads) for m in MODALITIES}
            self.input_shapes = {m: tuple(encoders[m]["input_shape"]) for m in MODALITIES}
            self.inputs = {m: encoders[m].get("input", "features") for m in MODALITIES}
            self.indexes = load_indexes(self.path, self.manifest["index"]) if "index" in self.manifest else None
        except (OSError, KeyError, ValueError, CodeStoreError) as err:
            raise ModelLoadError(f"{self.path}: cannot load model version: {err}") from err
        except Exception as err:  # onnxruntime raises its own types for a bad model file
            raise ModelLoadError(f"{self.path}: cannot load model version: {type(err).__name__}: {err}") from err
        if self.manifest.get("bits") != self.store.bits or tuple(self.manifest["categories"]) != self.store.categories:
            raise ModelLoadError(f"{self.path}: manifest and code store disagree (bits or categories)")
        if self.manifest.get("version") != self.path.name:
            raise ModelLoadError(f"{self.path}: its manifest names version {self.manifest.get('version')} "
                                 "(a copied folder?)")
        self.deleted = frozenset(self.manifest.get("deleted_ids_sha256", ()))  # sha256 of ids erased before
        vocab = self.manifest.get("text_vocabulary")
        self.vocabulary = TextVocabulary(**vocab) if vocab else None
        self.self_check()

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def bits(self) -> int:
        return self.store.bits

    def self_check(self) -> None:
        """Run one input through each encoder and the search, so a broken model is refused at
        load, not at query (and the first query does not pay for compiling the search kernel)."""
        for m in MODALITIES:
            try:
                dtype = np.uint8 if self.inputs[m] == "pixels" else np.float32
                codes = self.encode(m, np.zeros((1, *self.input_shapes[m]), dtype))
                if len(self.store):
                    self.top_k(codes, m, 1, None)
            except Exception as err:  # noqa: BLE001 - any failure here means the version is unusable
                raise ModelLoadError(f"{self.path}: {m} encoder fails on a test input: {err}") from err

    def info(self) -> dict:
        return {"model_version": self.version, "method": self.manifest["method"], "bits": self.bits,
                "categories": list(self.store.categories), "database_size": len(self.store),
                "stage": self.manifest["stage"], "input_shapes": {m: list(s) for m, s in self.input_shapes.items()},
                "inputs": dict(self.inputs),
                "text_vocabulary": self.vocabulary is not None, "providers": list(execution_providers()),
                "index": self.manifest.get("index", {"kind": "flat"})}

    def features(self, modality: str, features=None, words: list[list[str]] | None = None) -> np.ndarray:
        """Validate a query's inputs into a float32 array the encoder accepts."""
        if modality not in MODALITIES:
            raise QueryError(f"unknown modality {modality!r}; expected 'image' or 'text'")
        if (features is None) == (words is None):
            raise QueryError("send exactly one of 'features', 'words' or a photo")
        if self.inputs[modality] == "pixels":
            raise QueryError(f"this version's {modality} encoder takes photos, not feature vectors: send a JPEG "
                             "or PNG (a multipart file part or base64 'images')")
        if words is not None:
            if modality != "text":
                raise QueryError("'words' queries are for the text modality only")
            if self.vocabulary is None:
                raise QueryError("this model version has no text vocabulary; send 'features'")
            if not words:
                raise QueryError("empty query: 'words' has no rows")
            return self.vocabulary.vectorize(words)
        try:
            x = np.asarray(features, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise QueryError(f"'features' must be a list of equal-length number lists: {err}") from err
        shape = self.input_shapes[modality]
        if x.ndim == len(shape):
            x = x[None]
        if x.ndim == 2 and len(shape) > 1 and x.shape[1] == int(np.prod(shape)):
            x = x.reshape(len(x), *shape)  # pixels sent as flat rows
        if x.shape[0] == 0:
            raise QueryError("empty query: 'features' has no rows")
        if x.shape[1:] != shape:
            raise QueryError(f"{modality} features must have shape {list(shape)} per row, got {list(x.shape[1:])}")
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if bad.any():
            raise QueryError(f"rows {np.flatnonzero(bad)[:10].tolist()} hold NaN or infinite values "
                             "(or values beyond float32)")
        return x

    def photos(self, modality: str, files: list[bytes]) -> np.ndarray:
        """Encoded photos → the pixels this version's image encoder takes, or a QueryError naming
        the photo and what is wrong with it."""
        if modality != "image":
            raise QueryError("photos are queries of the image modality")
        if self.inputs["image"] != "pixels":
            raise QueryError("this version's image encoder takes feature vectors (a model trained with "
                             "model.image_backbone: none): send 'features'")
        if not files:
            raise QueryError("empty query: no photos")
        size = self.input_shapes["image"][0]
        pixels = np.empty((len(files), *self.input_shapes["image"]), np.uint8)
        for i, data in enumerate(files):
            try:
                pixels[i] = decode_photo(data, size, self.photo_limits)
            except PhotoError as err:
                raise QueryError(f"photo {i}: {err}") from err
        return pixels

    def encode(self, modality: str, x: np.ndarray) -> np.ndarray:
        """Validated features (or pixels) → packed uint64 codes."""
        return words_from_bytes(self.sessions[modality].run(["bits"], {self.inputs[modality]: x})[0])

    def search(self, modality: str, x: np.ndarray, k: int, radius: int | None,
               targets: tuple[str, ...], where: ItemFilter | None = None) -> list[dict[str, list[dict]]]:
        """Top-k database items per query, for each target side ("image" / "text" codes),
        among the items ``where`` lets through."""
        if radius is not None and not 0 <= radius <= self.bits:
            raise QueryError(f"radius must be within 0..{self.bits}, got {radius}")
        self.check_filter(where)
        codes = self.encode(modality, x)
        results: list[dict[str, list[dict]]] = [{} for _ in range(len(x))]
        for target in targets:
            for q, hits in enumerate(as_hits(self.store, *self.top_k(codes, target, k, radius, where))):
                results[q][target] = hits
        return results

    def check_filter(self, where: ItemFilter | None) -> None:
        """A filter naming a category this version does not have is a QueryError."""
        if where:
            try:
                self.store.category_columns(where.any_of + where.all_of)
            except CodeStoreError as err:
                raise QueryError(f"filter: {err}") from err

    def top_k(self, codes: np.ndarray, target: str, k: int, radius: int | None,
              where: ItemFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(indices, distances) of the ``target`` codes nearest each query: on the version's
        approximate index when it has one, else exact. A filtered search is always exact (an
        approximate index would return fewer than k hits when its candidates miss the filter)."""
        if self.indexes is None or where:
            return self.store.search(codes, target, k, radius, where)
        return search_index(self.indexes[target], codes, self.bits, k, radius)


def as_hits(store: CodeStore, idx: np.ndarray, dist: np.ndarray) -> list[list[dict]]:
    """Top-k rows as hits {id, distance, stage, labels}, one list per query. Columns are
    gathered with numpy; an item's label names come from one list per distinct label set."""
    names, label_set = store.label_sets()
    found = idx >= 0
    rows = idx[found]
    ids, stages = store.ids[rows].tolist(), store.stage[rows].tolist()
    labels = [names[s] for s in label_set[rows].tolist()]
    out, start = [], 0
    for count, distances in zip(found.sum(axis=1).tolist(), dist.tolist(), strict=True):
        out.append([{"id": ids[j], "distance": distances[j - start], "stage": stages[j], "labels": labels[j]}
                    for j in range(start, start + count)])
        start += count
    return out

