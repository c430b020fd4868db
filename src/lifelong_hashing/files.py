"""Atomic, byte-stable writes: the one way the project writes its arrays and records.

Atomic (temp file in the same folder + rename) so that a crash never leaves half a file. Byte
stable (no timestamps, fixed member order, sorted JSON keys) so that the same content gives the
same bytes: DVC hashes the outputs of ``dvc repro``, and a file that differs only in a zip
timestamp would make every repro look like a change. ``np.savez`` stamps each member with the
current time, hence a writer of our own on ``zipfile``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

import numpy as np

_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip member can carry


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Open a temp file beside ``path`` for writing; it replaces ``path`` only when the block
    ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], *, compress: bool = False) -> Path:
    """An ``.npz`` that ``np.load`` reads, written atomically with members in the given order
    and a fixed timestamp."""
    path = Path(path)
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with atomic_write(path) as fh, zipfile.ZipFile(fh, "w", compression=method) as archive:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.compress_type = method
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
    return path


def write_json(path: str | os.PathLike, record) -> Path:
    """Indented JSON with sorted keys and a final newline, written atomically."""
    path = Path(path)
    with atomic_write(path) as fh:
        fh.write((json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    with atomic_write(path) as fh:
        fh.write(text.encode())
    return path


def sha256_of(path: str | os.PathLike) -> str:
    """The content hash a batch is known by (read in 1 MB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
