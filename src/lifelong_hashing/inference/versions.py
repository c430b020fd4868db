"""Model versions for serving, and the promotion pointer the service follows: reading them
(list, current, promote), without PyTorch; ``export.publish`` writes them.

    models/
      versions/v0001/  image.onnx  text.onnx  [*.int8.onnx]  codes.npz  manifest.json
      CURRENT          the served version's name, replaced atomically on promotion

A version is written into a hidden temporary folder and renamed into place only when export and
parity succeeded, so a failed export never leaves a half version behind; promotion is a single
atomic rename of the pointer file.
"""

from __future__ import annotations

import re
from pathlib import Path

from lifelong_hashing.files import write_text

POINTER = "CURRENT"
_NAME = re.compile(r"^v(\d{4,})$")


class VersionError(ValueError):
    pass


def version_name(number: int) -> str:
    return f"v{number:04d}"


def versions_dir(models_dir: str | Path) -> Path:
    return Path(models_dir) / "versions"


def version_number(name: str) -> int:
    match = _NAME.match(name)
    if not match:
        raise VersionError(f"{name!r} is not a version name (v0001, v0002, ...)")
    return int(match.group(1))


def list_versions(models_dir: str | Path) -> list[str]:
    root = versions_dir(models_dir)
    names = [p.name for p in root.iterdir() if _NAME.match(p.name)] if root.exists() else []
    return sorted(names, key=version_number)


def promote(models_dir: str | Path, version: str) -> None:
    """Point serving at ``version`` (atomic replace of the pointer file), only once the version
    has loaded and encoded a test input as the service will load it: a version that cannot
    serve is refused here, and serving keeps the one it has."""
    check_servable(models_dir, version)
    point_serving_at(models_dir, version)


def check_servable(models_dir: str | Path, version: str) -> None:
    """Raise ``VersionError`` unless ``version`` is published and loads as the service loads it."""
    from lifelong_hashing.inference.retrieval import ModelLoadError, RetrievalModel

    target = versions_dir(models_dir) / version
    if not _NAME.match(version) or not (target / "manifest.json").exists():
        raise VersionError(f"{models_dir}: no published version {version!r} (have {list_versions(models_dir)})")
    try:
        RetrievalModel(target)
    except ModelLoadError as err:
        raise VersionError(f"refusing to promote {version}: {err}") from err


def point_serving_at(models_dir: str | Path, version: str) -> None:
    """The pointer write alone, for a version ``check_servable`` passed."""
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
