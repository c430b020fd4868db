"""Model versions for serving, and the promotion pointer the service follows.

    models/
      versions/v0001/  image.onnx  text.onnx  [*.int8.onnx]  codes.npz  manifest.json
      CURRENT          the served version's name, replaced atomically on promotion

A version is written into a hidden temporary folder and renamed into place only when export and
parity succeeded, so a failed export never leaves a half version behind; promotion is a single
atomic rename of the pointer file.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from . import __version__
from .batch import read_npz
from .config import DatasetConfig, ExportConfig
from .export import export_method, vocabulary_hash
from .files import write_json, write_text
from .state import RunState

POINTER = "CURRENT"
_NAME = re.compile(r"^v(\d{4,})$")


class VersionError(ValueError):
    pass


def version_name(number: int) -> str:
    return f"v{number:04d}"


def versions_dir(models_dir: str | Path) -> Path:
    return Path(models_dir) / "versions"


def list_versions(models_dir: str | Path) -> list[str]:
    root = versions_dir(models_dir)
    names = [p.name for p in root.iterdir() if _NAME.match(p.name)] if root.exists() else []
    return sorted(names, key=lambda n: int(n[1:]))


def text_vocabulary(cfg: DatasetConfig) -> dict | None:
    """Words (and idf) of the text feature columns, when the dataset names them."""
    if not cfg.vocabulary_key:
        return None
    arrays = read_npz(cfg.path, [k for k in (cfg.vocabulary_key, cfg.idf_key) if k])
    idf = arrays[cfg.idf_key].astype(float).tolist() if cfg.idf_key else None
    return {"words": [str(w) for w in arrays[cfg.vocabulary_key]], "idf": idf, "l2_normalize": cfg.text_l2_normalize}


def publish(state: RunState, models_dir: str | Path, cfg: ExportConfig, number: int | None = None) -> Path:
    """Export a state's encoders and code store as version ``number`` (default: the next one),
    not yet promoted."""
    root = versions_dir(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    existing = list_versions(models_dir)
    name = version_name(number if number is not None else int(existing[-1][1:]) + 1 if existing else 1)
    if (root / name).exists():
        raise VersionError(f"{root / name} already exists")
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.tmp-"))
    try:
        report = export_method(state.method, tmp, model_version=name, int8_min_agreement=cfg.int8_min_agreement)
        state.store.save(tmp / "codes.npz")
        method = state.method
        manifest = {
            "version": name, "project_version": __version__,
            "method": method.name, "stage": method.stage, "bits": method.bits,
            "categories": list(method.categories), "vocabulary_hash": vocabulary_hash(method.categories),
            "database_size": len(state.store), **report,
            "text_vocabulary": text_vocabulary(state.params.dataset),
        }
        write_json(tmp / "manifest.json", manifest)
        tmp.rename(root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / name


def promote(models_dir: str | Path, version: str) -> None:
    """Point serving at ``version`` (atomic replace of the pointer file), only once the version
    has loaded and encoded a test input as the service will load it: a version that cannot
    serve is refused here, and serving keeps the one it has."""
    from .retrieval import ModelLoadError, RetrievalModel

    target = versions_dir(models_dir) / version
    if not _NAME.match(version) or not (target / "manifest.json").exists():
        raise VersionError(f"{models_dir}: no published version {version!r} (have {list_versions(models_dir)})")
    try:
        RetrievalModel(target)
    except ModelLoadError as err:
        raise VersionError(f"refusing to promote {version}: {err}") from err
    write_text(Path(models_dir) / POINTER, version + "\n")


def current_version(models_dir: str | Path) -> str | None:
    """The promoted version's name; None when nothing is promoted. The pointer's content is a
    name, never a path: anything but the name of a version folder under ``versions/`` raises."""
    pointer = Path(models_dir) / POINTER
    if not pointer.exists():
        return None
    name = pointer.read_text(errors="replace").strip()
    if not _NAME.match(name) or not (versions_dir(models_dir) / name).is_dir():
        raise VersionError(f"{pointer} names {name[:80]!r}, which is not a version under {versions_dir(models_dir)}")
    return name


def current_dir(models_dir: str | Path) -> Path:
    name = current_version(models_dir)
    if name is None:
        raise VersionError(f"{models_dir}: nothing promoted yet (no {POINTER} file)")
    return versions_dir(models_dir) / name
