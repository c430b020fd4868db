"""Erasure through the pipeline: a text file of item ids (one a line, UTF-8) dropped into
``pipeline.deletions`` is a deletion request, processed like a batch:

    scan  →  pin  →  read the ids  →  delete them from a copy of the state  →  export
          →  record (purging every kept copy)  →  promote  →  retire the request

The request format is ``engine/requests.py``'s. A request that does not read, or names an id
that was never stored, is quarantined with the reason and changes nothing; ids deleted before
are skipped, and a request with nothing left to delete changes nothing either. The state keeps
no deleted id, only its sha256 (``runner.delete_items``), and the manifest keeps the request's
hash, name and count, not its ids.

What erasure reaches: the code store, the method's memory and kept batches, the reference samples
and the export-parity photos (``runner.delete_items``); every batch file the workspace keeps
(``batches/``) and the quarantine keeps, the discovery reports; and the version folders published before it, which hold
the items' codes (removed from ``models/versions``). What still holds them afterwards, by design
of version control: the DVC cache and remote, whose objects of older commits keep history, until
``lhash purge`` (``purge_history``) collects every object the commits since the latest erasure do
not use. Git holds no item data (manifest, metrics, params, DVC pointers). Rolling back to a
version recorded before an erasure is refused: it would serve erased items again.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from lifelong_hashing.config import Params
from lifelong_hashing.engine.batch import BatchError, erase_from_batch_file
from lifelong_hashing.engine.codestore import CodeStoreError
from lifelong_hashing.engine.requests import REQUEST_SUFFIX, read_deletion_ids
from lifelong_hashing.engine.runner import delete_items
from lifelong_hashing.engine.state import save_state
from lifelong_hashing.files import write_text
from lifelong_hashing.inference.versions import list_versions, version_name, version_number
from lifelong_hashing.operations.discovery import erase_from_reports
from lifelong_hashing.operations.pipeline import (
    DELETIONS_KEY,
    Arrival,
    Candidate,
    current_state,
    evaluation_queries,
    map_by_direction,
    read_manifest,
)
from lifelong_hashing.operations.registry import Registry, RegistryError, parse_version, semver, version_tag


def delete(registry: Registry, arrival: Arrival, params: Params) -> Candidate | None:
    """The request's items erased from a copy of the current state, saved in the work folder as
    the next version's candidate; None when every id was deleted before."""
    state = current_state(registry)
    if state is None:
        raise BatchError(arrival.name, "ids", "nothing is stored yet")
    ids = read_deletion_ids(arrival.pinned, arrival.name)
    before = map_by_direction(state.history[-1])
    start = time.perf_counter()
    try:
        counts = delete_items(state, ids, evaluation_queries(params))
    except CodeStoreError as err:
        raise BatchError(arrival.name, "ids", str(err)) from None
    if not counts["deleted"]:
        return None
    work = registry.batch_work_dir(arrival.key)
    save_state(state, work / "state")
    return Candidate(arrival, "deletion", state.method.name, state.stage, [], counts["deleted"], work, before,
                     map_by_direction(state.history[-1]), {"delete": time.perf_counter() - start}, erased=ids)


def erase_kept_copies(registry: Registry, params: Params, ids: list[str], new_version: str) -> dict:
    """Within ``record``: the items out of every batch file kept in the workspace and the
    quarantine (and their ids out of quarantined requests and the discovery reports), and every
    version folder but ``new_version`` out of the workspace. Counts."""
    counts = {"batch_files": 0, "items": 0, "versions_removed": 0}
    kept = [*sorted(registry.batches_dir.glob("*.npz")), *sorted(Path(params.pipeline.quarantine).glob("*/batch.npz"))]
    for path in kept:
        erased = erase_from_batch_file(path, ids)
        counts["batch_files"] += bool(erased)
        counts["items"] += erased
    erased = set(ids)
    for path in sorted(Path(params.pipeline.quarantine).glob(f"*/request{REQUEST_SUFFIX}")):  # rejected requests
        lines = path.read_text(errors="replace").splitlines()
        if erased & set(lines):
            write_text(path, "".join(f"{line}\n" for line in lines if line not in erased))
    counts["discovery_reports"] = erase_from_reports(registry.reports_dir, ids)
    for name in list_versions(registry.models_dir):
        if name != new_version:
            shutil.rmtree(registry.versions_dir / name)
            counts["versions_removed"] += 1
    return counts


def erasure_floor(registry: Registry) -> int | None:
    """The version number of the latest erasure recorded in the workspace, if any."""
    entries = read_manifest(registry).get(DELETIONS_KEY, {}).values()
    return max((version_number(e["version"]) for e in entries), default=None)


def rollback(registry: Registry, version: str) -> str:
    """``Registry.rollback``, refused for a version recorded before the latest erasure."""
    refuse_before_erasure(registry, version)
    return registry.rollback(version)


def assign_stage(registry: Registry, version: str, stage: str) -> str:
    """Put ``version`` in ``stage`` (``prod`` also serves it, without restoring its training
    state: that is ``rollback``); refused for a version recorded before the latest erasure.
    Returns the version's name."""
    refuse_before_erasure(registry, version)
    number = parse_version(version)
    if version_tag(number) not in registry.tags():
        raise RegistryError(f"{registry.root}: no version {version!r} in the registry")
    if stage == "prod":
        return registry.serve(number)
    registry.assign(number, stage)
    return version_name(number)


def refuse_before_erasure(registry: Registry, version: str) -> None:
    floor = erasure_floor(registry)
    if floor is not None and parse_version(version) < floor:
        raise RegistryError(f"{version} was recorded before the erasure recorded as {version_name(floor)} "
                            f"({semver(floor)}); serving it would bring erased items back: use "
                            f"{version_name(floor)} or later")


def purge_history(registry: Registry) -> str:
    """Remove from the DVC cache and the remote every object that no commit since the latest
    erasure uses (``dvc gc`` with that scope): what older versions kept of erased items. The
    versions before it can no longer be checked out (rollback refuses them anyway). Irreversible."""
    floor = erasure_floor(registry)
    if floor is None:
        raise RegistryError(f"{registry.root}: no erasure recorded; nothing to purge")
    since = int(registry.git("rev-list", "--count", f"{version_tag(floor)}..HEAD").strip()) + 1
    registry.dvc("gc", "--workspace", "--rev", "HEAD", "--num", str(since), "--cloud", "--force")
    return (f"kept the DVC objects of the last {since} commits (from {version_name(floor)}, the latest erasure, "
            "on); removed every other from the cache and the remote")
