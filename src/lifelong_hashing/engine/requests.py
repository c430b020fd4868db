"""Deletion requests: a UTF-8 text file of item ids, one a line, that the pipeline erases when
it finds the file in ``pipeline.deletions`` (``operations/erasure.py``). Read and written here
without PyTorch: the service and ``lhash delete`` write them."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from lifelong_hashing.engine.batch import BatchError, name_problem, shown
from lifelong_hashing.files import atomic_write

REQUEST_SUFFIX = ".txt"
MAX_REQUEST_BYTES = 64 << 20


def deleted_id_hash(item_id: str) -> str:
    """What the state and the versions remember of a deleted item: enough to make a repeated
    deletion a no-op, nothing that names it."""
    return hashlib.sha256(item_id.encode()).hexdigest()


def read_deletion_ids(path: str | Path, source: str) -> list[str]:
    """The ids of a deletion request, or BatchError naming what is wrong (size, encoding, a line
    that is not an id, no ids at all). Blank lines are skipped."""
    with open(path, "rb") as fh:
        data = fh.read(MAX_REQUEST_BYTES + 1)
    if len(data) > MAX_REQUEST_BYTES:
        raise BatchError(source, "ids", f"over {MAX_REQUEST_BYTES:,} bytes; split the request")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BatchError(source, "ids", f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    ids = []
    for number, line in enumerate(text.split("\n"), 1):
        item = line.removesuffix("\r")
        if not item:
            continue
        problem = name_problem(item)
        if problem:
            raise BatchError(source, "ids", f"line {number}: {shown(item)} is not an id ({problem})")
        ids.append(item)
    if not ids:
        raise BatchError(source, "ids", "no ids (one a line)")
    return ids


def write_deletion_request(folder: str | Path, ids: list[str]) -> Path:
    """A request for ``ids`` in ``folder``, written under a hidden name and renamed into place
    whole (the pipeline never reads half a request). Its name: UTC time and content hash."""
    for item in ids:
        problem = name_problem(item)
        if problem or not item or "\n" in item:
            raise BatchError("<request>", "ids", f"{shown(item)} is not an id ({problem or 'empty'})")
    data = "".join(f"{item}\n" for item in ids).encode()
    name = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{hashlib.sha256(data).hexdigest()[:12]}{REQUEST_SUFFIX}"
    target = Path(folder) / name
    with atomic_write(target) as fh:
        fh.write(data)
    return target


def pending_deletion_ids(folder: str | Path) -> set[str]:
    """Every id named by the requests waiting in ``folder`` (hidden and unreadable files are
    not requests yet, or the pipeline's to reject)."""
    ids: set[str] = set()
    folder = Path(folder)
    if not folder.is_dir():
        return ids
    for entry in folder.iterdir():
        if entry.suffix == REQUEST_SUFFIX and not entry.name.startswith(".") and entry.is_file() \
                and not entry.is_symlink():
            try:
                ids.update(read_deletion_ids(entry, entry.name))
            except (BatchError, OSError):
                continue
    return ids
