"""Everything that carries over between stages, in one directory, so a stage can run in a fresh
process: method weights and memory (``model/``), the code store (``codes.npz``), the reference
profile of the data trained on (``reference.npz``), for a photo model a few of its latest photos
(``photos.npz``, what the export checks ONNX parity on) and the run's history (``state.json``: params,
categories, the text vocabulary, per-stage results and mAP rows).

Saving is atomic: the new state is written beside the old one and swapped in with renames, so
a crash mid-save leaves the last good state in place. It is also byte stable: the same params,
thread count, CPU and library wheels give the same files (``files.py``), so DVC's hash of a state
means its content. Wall-clock timings are therefore kept out of it, in ``timings.json`` beside
the state directory.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lifelong_hashing import __version__
from lifelong_hashing.config import Params
from lifelong_hashing.engine.codestore import CodeStore
from lifelong_hashing.engine.datasets import text_vocabulary
from lifelong_hashing.engine.images import load_photos, save_photos
from lifelong_hashing.engine.methods import Method, create_method
from lifelong_hashing.engine.reference import ReferenceProfile
from lifelong_hashing.files import write_json


class StateError(ValueError):
    pass


@dataclass
class RunState:
    params: Params
    method: Method
    store: CodeStore
    history: list[dict] = field(default_factory=list)  # one record per completed stage
    reference: ReferenceProfile = field(default_factory=ReferenceProfile)
    timings: list[dict] = field(default_factory=list)  # seconds per trained stage (not part of the state)
    text_vocabulary: dict | None = None  # words and idf of the text columns, read once at stage 0
    photos: tuple[bytes, ...] = ()  # photo models: a few encoded photos of the latest batch (export parity)
    photo_ids: tuple[str, ...] = ()  # their items' ids (erasure takes a deleted item's photo too)
    deleted: set[str] = field(default_factory=set)  # deleted_id_hash of every deleted item

    @property
    def stage(self) -> int:
        return self.method.stage


TIMING_KEYS = ("train_seconds", "encode_seconds")


def timings_path(directory: str | Path) -> Path:
    """``timings.json`` beside a state directory (in a run folder: beside metrics.json)."""
    return Path(directory).parent / "timings.json"


def runtime_info(threads: int) -> dict:
    """What besides params decides the codes bit for bit: the thread count, the CPU's vector
    capability (which MKL/oneDNN kernels run) and the library builds."""
    import numpy
    import torch

    return {"threads": threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "project_version": __version__}


def new_state(params: Params, image_shape: tuple[int, ...], text_dim: int) -> RunState:
    """A state before stage 0; the dataset's text vocabulary (when it names one) is kept in it, so
    an export never needs the training data file again."""
    method = create_method(params.method.name, params, image_shape, text_dim)
    return RunState(params, method, CodeStore(params.model.bits), text_vocabulary=text_vocabulary(params.dataset))


def save_state(state: RunState, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.new-"))
    try:
        state.method.save(tmp / "model")
        state.store.save(tmp / "codes.npz")
        state.reference.save(tmp / "reference.npz")
        if state.photos:
            save_photos(tmp / "photos.npz", state.photos, state.photo_ids)
        write_json(tmp / "state.json", {
            "project_version": __version__, "method": state.method.name, "stage": state.stage,
            "categories": list(state.method.categories), "bits": state.params.model.bits,
            "params": state.params.model_dump(), "runtime": runtime_info(state.params.train.threads),
            "text_vocabulary": state.text_vocabulary, "history": state.history,
            "deleted_ids_sha256": sorted(state.deleted)})
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json(timings_path(directory), state.timings)
    return directory


def _read_record(directory: Path) -> tuple[dict, Params, dict]:
    try:
        record = json.loads((directory / "state.json").read_text())
        params = Params.model_validate(record["params"])
        meta = json.loads((directory / "model" / "method.json").read_text())
    except FileNotFoundError as err:
        raise StateError(f"{directory}: not a state directory (missing {Path(err.filename).name})") from err
    except (json.JSONDecodeError, KeyError, ValueError) as err:
        raise StateError(f"{directory}: unreadable state: {err}") from err
    return record, params, meta


def save_method(method: Method, directory: str | Path) -> Path:
    """What a worker needs to encode with ``method``: its encoders and params, without the code
    store, history or data kept for training (``load_method`` reads it)."""
    directory = Path(directory)
    method.save_encoders(directory / "model")
    write_json(directory / "state.json", {"method": method.name, "params": method.params.model_dump()})
    return directory


def load_method(directory: str | Path) -> Method:
    """A state's trained method alone: what encoding needs, without the code store (a worker
    encoding shards of a batch)."""
    return _restore_method(Path(directory), *_read_record(Path(directory)))


def _restore_method(directory: Path, record: dict, params: Params, meta: dict) -> Method:
    method = create_method(record["method"], params, tuple(meta["image_shape"]), meta["text_dim"])
    method.restore(directory / "model")
    return method


def load_state(directory: str | Path) -> RunState:
    directory = Path(directory)
    record, params, meta = _read_record(directory)
    method = _restore_method(directory, record, params, meta)
    store = CodeStore.load(directory / "codes.npz")
    if len(store.categories) != len(method.categories):
        raise StateError(f"{directory}: code store and model disagree on the vocabulary")
    timings = timings_path(directory)
    return RunState(params, method, store, record["history"], ReferenceProfile.load(directory / "reference.npz"),
                    json.loads(timings.read_text()) if timings.exists() else [], record.get("text_vocabulary"),
                    *load_photos(directory / "photos.npz"), set(record.get("deleted_ids_sha256", [])))
