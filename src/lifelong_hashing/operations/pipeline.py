"""The operational pipeline as plain steps; ``flows/pipeline.py`` runs them as Prefect tasks.

    scan  →  pin  →  validate  →  train (new categories) | append (known ones)  →  export
          →  monitor  →  record (DVC + git tag)  →  promote  →  retire the incoming file

``pin`` copies the incoming file into the work folder, hashing what it copies; every later step
reads that copy (validation loads it once and hands the batch on), so a file replaced or renamed
mid-run changes nothing. Every step before ``record`` writes only into ``<workspace>/.work/``;
the live state, the versions and the serving pointer change only in ``record`` (a transaction:
``Registry.begin``, ``recover``) and ``promote``, so a failure anywhere earlier leaves the served
model as it was and the batch in the incoming folder for the next run. A rejected batch
(validation, or a monitoring alert when ``block_on_alerts``) goes to the quarantine folder with
its report.

Failures are of two kinds. A defect of the batch itself (``BatchError``: it does not load, or
validation refused it) quarantines it at once, with the reason. Anything else (a full disk, an
unreachable remote, a crash in a tool, a step over its time budget) may pass: the batch stays in
the incoming folder and the next run tries it again; after ``pipeline.max_attempts`` attempts
(counted before the work, so a run killed on the batch counts) it is quarantined as poison with
every error. Either way the run goes on with the other batches.

Incoming file names are recorded, never used to build a path: the batch is known by its content
hash, and only regular ``.npz`` files directly inside the incoming folder are read. Names are
shown with ``printable`` (logs) and ``markdown_text`` (Prefect artifacts), never raw.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from lifelong_hashing.config import ExportConfig, IndexConfig, MonitoringConfig, Params
from lifelong_hashing.engine.batch import Batch, BatchError, load_batch
from lifelong_hashing.engine.datasets import load_dataset
from lifelong_hashing.engine.images import PhotoReader
from lifelong_hashing.engine.methods.base import encode_here
from lifelong_hashing.engine.metrics import DIRECTIONS, query_scores
from lifelong_hashing.engine.on_dask import DaskCluster, DaskEncoder, DaskScorer
from lifelong_hashing.engine.requests import REQUEST_SUFFIX
from lifelong_hashing.engine.runner import (
    append_known,
    history_summary,
    learn_stage,
    remove_for_update,
    write_plots,
)
from lifelong_hashing.engine.stages import Stage
from lifelong_hashing.engine.state import RunState, load_state, new_state, save_state, timings_path
from lifelong_hashing.files import atomic_write, sha256_of, write_json, write_text
from lifelong_hashing.inference.versions import list_versions, version_name, version_number
from lifelong_hashing.operations.data_contract import CONTEXT_DIR
from lifelong_hashing.operations.registry import Registry, version_tag
from lifelong_hashing.operations.validation import BatchExpectations, ValidationResult, validate_batch

MANIFEST_KEY = "batches"
DELETIONS_KEY = "deletions"


class BatchRejected(RuntimeError):
    """A batch was kept aside (quarantined); the message says why."""


@dataclass(frozen=True)
class Arrival:
    """A batch file found in the incoming folder; once ``pin`` copied it, the copy every step
    reads (``pinned``) and the incoming file's identity when it was copied."""

    path: Path
    name: str  # as dropped; for the record only
    sha256: str
    size: int
    pinned: Path | None = None
    identity: tuple[int, ...] = ()  # (device, inode, size, mtime) of the incoming file at pinning

    @property
    def key(self) -> str:
        return self.sha256[:16]

    def unchanged(self) -> bool:
        """The incoming file is still the one that was pinned (not replaced, rewritten or gone)."""
        try:
            return _identity(os.stat(self.path, follow_symlinks=False)) == self.identity
        except OSError:
            return False


def _identity(stat: os.stat_result) -> tuple[int, ...]:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


class ArrivalChanged(RuntimeError):
    """An incoming file changed or vanished between the scan and its pinning: left for the next run."""


@dataclass(frozen=True)
class Scan:
    pending: list[Arrival]  # new content, oldest first
    duplicates: list[tuple[Arrival, dict]]  # content already processed, with its manifest entry
    skipped: list[tuple[str, str]]  # (name, why) of every other entry: hidden, links, folders, others


def printable(name: str) -> str:
    """A file name fit for a log line: control and other unprintable characters escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in name)


def markdown_text(text: str) -> str:
    """Text that renders as itself in markdown: escaped markup and HTML, no line breaks."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~>])", r"\\\1", html.escape(printable(text), quote=False))


@dataclass
class Candidate:
    """What one batch produced so far; paths point into the work folder until ``record``."""

    arrival: Arrival
    kind: str  # "increment" (new categories, trained) or "append" (known categories, encoded only)
    method: str
    stage: int
    new_categories: list[str]
    items: int
    work: Path
    before: dict | None  # average mAP per direction before this batch (None for the first)
    after: dict
    seconds: dict = field(default_factory=dict)
    shards_on_dask: int = 0  # database-code shards encoded by Dask workers (pipeline.dask)
    query_shards_on_dask: int = 0  # evaluation query shards scored by them
    validation_dir: str = ""
    version_dir: str = ""
    monitor_dir: str = ""
    alerts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    erased: list[str] = field(default_factory=list, repr=False)  # a deletion's ids: purged from kept files
    replaced: int = 0  # stored items the batch updated (pipeline.repeated_ids: replace, or labelled late)
    discovery: dict | None = field(default=None, repr=False)  # its unlabelled items screened (operations.discovery)

    @property
    def state_dir(self) -> Path:
        return self.work / "state"


def read_manifest(registry: Registry) -> dict:
    if not registry.manifest_path.exists():
        return {MANIFEST_KEY: {}}
    return json.loads(registry.manifest_path.read_text())


def read_metrics(registry: Registry) -> dict:
    return json.loads(registry.metrics_path.read_text())


def reconcile_serving(registry: Registry) -> str | None:
    """Finish what a run that stopped between recording and serving left: a version recorded at
    HEAD that was never in ``prod`` is promoted (the run that recorded it would have), and the
    service's pointer is made to name the ``prod`` version. Returns the version now served, if
    anything changed."""
    from lifelong_hashing.inference.versions import VersionError, current_version, point_serving_at

    if not registry.tags():
        return None
    recorded = registry.version_at("HEAD")
    if recorded is not None and not registry.was_in_stage(recorded, "prod"):
        return registry.serve(recorded)
    prod = registry.in_stage("prod")
    if prod is None:
        return None
    try:
        if current_version(registry.models_dir) == version_name(prod):
            return None
    except VersionError:
        pass  # a pointer that names no version: repaired below
    point_serving_at(registry.models_dir, version_name(prod))
    return version_name(prod)


def arrival_folders(params: Params) -> dict[Path, tuple[str, str]]:
    """Where arrivals land, each folder with its file suffix and kind: deletion requests, then
    batches (the order a run takes them in)."""
    return {Path(params.pipeline.deletions): (REQUEST_SUFFIX, "deletion request"),
            Path(params.pipeline.incoming): (".npz", "batch file")}


def scan_incoming(incoming: str | Path, manifest: dict, suffix: str = ".npz", key: str = MANIFEST_KEY,
                  kind: str = "batch file") -> Scan:
    """Fingerprint each ``suffix`` file directly inside ``incoming`` (batch files; deletion
    requests with their suffix, manifest ``key`` and ``kind``); the manifest says which are done.
    Symbolic links are never followed, so no name can lead outside the folder."""
    incoming = Path(incoming)
    incoming.mkdir(parents=True, exist_ok=True)
    done = manifest.get(key, {})
    found, skipped = [], []
    for entry in incoming.iterdir():
        why = not_an_arrival(entry, suffix, kind)
        if why:
            skipped.append((entry.name, why))
            continue
        stat = entry.stat()
        found.append((stat.st_mtime_ns, entry.name,
                      Arrival(entry, entry.name, sha256_of(entry), stat.st_size, identity=_identity(stat))))
    pending, duplicates, seen = [], [], set()
    for _, _, arrival in sorted(found, key=lambda f: (f[0], f[1])):
        if arrival.sha256 in done:
            duplicates.append((arrival, done[arrival.sha256]))
        elif arrival.sha256 in seen:
            duplicates.append((arrival, {"name": "an earlier file of this scan"}))
        else:
            seen.add(arrival.sha256)
            pending.append(arrival)
    return Scan(pending, duplicates, sorted(skipped))


def not_an_arrival(entry: Path, suffix: str, kind: str) -> str | None:
    """Why an entry of a watched folder is not read, or None if it is to be."""
    if entry.name.startswith("."):
        return "hidden (partial uploads and editor files are left alone)"
    if entry.is_symlink():
        return "a symbolic link (never followed)"
    if entry.is_dir():
        return "a folder"
    if not entry.is_file():
        return "not a regular file"
    if entry.suffix != suffix:
        return f"not a {kind} ({suffix})"
    return None


def pin(registry: Registry, arrival: Arrival) -> Arrival:
    """Copy an incoming file into the run's ``pinned`` folder, hashing what is copied: every
    later step reads exactly these bytes, whatever happens to the incoming file meanwhile.
    Raises ``ArrivalChanged`` when the file is gone, or is not what the scan hashed."""
    registry.pinned_dir.mkdir(parents=True, exist_ok=True)
    target = registry.pinned_dir / f"{arrival.key}{arrival.path.suffix}"
    digest = hashlib.sha256()
    try:
        fd = os.open(arrival.path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        raise ArrivalChanged(f"{printable(arrival.name)} cannot be read any more ({err.strerror})") from err
    with os.fdopen(fd, "rb") as src, atomic_write(target) as dst:
        before = _identity(os.fstat(src.fileno()))
        for block in iter(lambda: src.read(1 << 20), b""):
            digest.update(block)
            dst.write(block)
        if _identity(os.fstat(src.fileno())) != before:
            raise ArrivalChanged(f"{printable(arrival.name)} was being written while it was read")
    if digest.hexdigest() != arrival.sha256:
        target.unlink()
        raise ArrivalChanged(f"{printable(arrival.name)} changed after the scan")
    return replace(arrival, pinned=target, identity=before)


def current_state(registry: Registry) -> RunState | None:
    return load_state(registry.state_dir) if (registry.state_dir / "state.json").exists() else None


def evaluation_queries(params: Params) -> Batch:
    """The held-out queries every version is scored on: ``pipeline.queries`` or the dataset's split."""
    if params.pipeline.queries:
        return load_batch(params.pipeline.queries, photos=PhotoReader.from_params(params))
    return load_dataset(params.dataset, params.seed).queries


def validate(registry: Registry, arrival: Arrival, params: Params) -> ValidationResult:
    """The batch against the current model, or before the first one against what params ask for
    (a photo model reads photos from the first batch on), through a copy of the workspace's data
    contract (``gx/``): the batch's recording keeps the copy, a rejection leaves the workspace
    as it was."""
    state = current_state(registry)
    expected = (BatchExpectations.from_state(state, params.pipeline.repeated_ids) if state
                else BatchExpectations.none(PhotoReader.from_params(params)))
    config = params.validation
    work = registry.batch_work_dir(arrival.key)
    contract = work / "contract"  # the workspace's data contract, changed only if this batch is recorded
    if registry.contract_dir.is_dir():
        shutil.copytree(registry.contract_dir, contract / CONTEXT_DIR, ignore=shutil.ignore_patterns("uncommitted"),
                        dirs_exist_ok=True)
    return validate_batch(arrival.pinned, expected, config, work / "validation", sha256=arrival.sha256,
                          source=arrival.name, context_root=contract)


def quarantine(arrival: Arrival, quarantine_dir: str | Path, reason: str, reports: list[Path],
               kind: str = "rejected", errors: list[str] | None = None) -> Path:
    """Keep a batch aside with its reports and the reason; nothing is lost or overwritten. The
    folder is built under a hidden name and renamed when complete, with the pinned bytes (the
    ones judged); the incoming file goes only if it is still those bytes.
    ``kind``: rejected (validation, alerts), defect (it does not load) or poison (it kept failing)."""
    quarantine_dir = Path(quarantine_dir)
    dest = quarantine_dir / f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{arrival.key}"
    partial = quarantine_dir / f".{dest.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for report in reports:
        if report.is_dir():
            shutil.copytree(report, partial / report.name)
    write_json(partial / "reason.json", {"file": arrival.name, "sha256": arrival.sha256, "size": arrival.size,
                                         "kind": kind, "reason": reason, "errors": errors or []})
    kept_as = "batch.npz" if arrival.path.suffix == ".npz" else f"request{arrival.path.suffix}"
    shutil.copyfile(arrival.pinned or arrival.path, partial / kept_as)
    partial.rename(dest)
    retire(arrival)
    return dest


def is_batch_defect(error: BaseException) -> bool:
    """A failure that the same bytes will always give (quarantine now), as opposed to one of the
    environment, which the next run may not meet."""
    return isinstance(error, BatchError)


_STARTED = "started; the run stopped before it ended (killed?)"


def start_attempt(registry: Registry, arrival: Arrival) -> list[str]:
    """Count an attempt at ``arrival`` in the workspace's ledger before any work, so that a run
    killed midway counts too; returns the earlier attempts' errors."""
    ledger = _read_attempts(registry)
    errors = ledger.setdefault(arrival.sha256, {"name": arrival.name, "errors": []})["errors"]
    earlier = list(errors)
    errors.append(f"{_now()} {_STARTED}")
    write_json(registry.attempts_path, ledger)
    return earlier


def count_failure(registry: Registry, arrival: Arrival, error: BaseException) -> list[str]:
    """Say why the attempt ``start_attempt`` counted failed; returns every error so far."""
    ledger = _read_attempts(registry)
    errors = ledger.setdefault(arrival.sha256, {"name": arrival.name, "errors": []})["errors"]
    if errors and errors[-1].endswith(_STARTED):
        errors.pop()
    errors.append(f"{_now()} {type(error).__name__}: {error}")
    try:
        write_json(registry.attempts_path, ledger)
    except OSError:  # a full disk: the reserve is there for this (taken again by the next run)
        registry.reserve_path.unlink(missing_ok=True)
        write_json(registry.attempts_path, ledger)
    return errors


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def forget_attempts(registry: Registry, arrival: Arrival) -> None:
    ledger = _read_attempts(registry)
    if ledger.pop(arrival.sha256, None) is not None:
        write_json(registry.attempts_path, ledger)


def _read_attempts(registry: Registry) -> dict:
    path = registry.attempts_path
    return json.loads(path.read_text()) if path.exists() else {}


def map_by_direction(record: dict) -> dict:
    return {d: float(record[d]["map_all"]) for d in DIRECTIONS}


def train(registry: Registry, arrival: Arrival, validation: ValidationResult, params: Params,
          cluster: DaskCluster | None = None) -> Candidate:
    """A batch with new categories is a lifelong increment (the configured method trains on it);
    a batch of known categories is encoded and appended, with no training. Either way the new
    state is evaluated on the held-out queries and saved into the work folder. Database codes
    (appended, or re-encoded by the joint baseline) and per-query scores are computed in this
    process, or with ``cluster`` shard by shard on its Dask workers."""
    work = registry.batch_work_dir(arrival.key)
    scorer, encoder = query_scores, encode_here
    if cluster is not None:
        encoder = DaskEncoder(cluster, work / "encoding", params.pipeline.dask.shard_rows)
        scorer = DaskScorer(cluster, work / "scoring", params.pipeline.dask.query_shard_rows)
    state = current_state(registry)
    batch = validation.batch  # the pinned bytes as validation loaded them
    if state is None:
        state = new_state(params, batch.image.shape[1:], batch.text.shape[1])
    before = map_by_direction(state.history[-1]) if state.history else None
    queries = evaluation_queries(params)
    start = time.perf_counter()
    batch = batch.for_model(state.method.categories)  # as validation built it
    if validation.photos:  # the sample is the batch's first photos
        state.photos, state.photo_ids = validation.photos, tuple(batch.ids[:len(validation.photos)].tolist())
    from lifelong_hashing.operations.discovery import screen

    report = screen(state, batch, queries, params.pipeline.discovery)  # against the model before the batch
    replaced = remove_for_update(state, batch.ids)  # updates: validation let them through
    if validation.new_categories:
        stage = Stage(state.stage + 1, tuple(validation.new_categories), batch.categories, batch)
        record = learn_stage(state, stage, queries, scorer, encoder)
        kind = "increment"
    else:
        record = append_known(state, batch, queries, scorer, encoder)
        kind = "append"
    if replaced:  # the one place a stored item's code changes: counted as such
        state.history[-1]["items_replaced"] = state.history[-1].get("items_replaced", 0) + replaced
    save_state(state, work / "state")
    candidate = Candidate(arrival, kind, state.method.name, state.stage, list(validation.new_categories), len(batch),
                          work, before, map_by_direction(record), {"train": time.perf_counter() - start},
                          validation_dir=str(work / "validation"), replaced=replaced, discovery=report)
    if cluster is not None:
        candidate.shards_on_dask, candidate.query_shards_on_dask = encoder.shards, scorer.shards
        if encoder.shards:
            candidate.seconds["encode_on_dask"] = encoder.seconds
    return candidate


def export(candidate: Candidate, registry: Registry, config: ExportConfig, index: IndexConfig) -> Candidate:
    """ONNX encoders with parity checks, the code store and its search index (``serving.index``),
    as the next version (not promoted); encoders unchanged since the last recorded version are
    taken from it rather than exported again."""
    from lifelong_hashing.inference.export import publish

    start = time.perf_counter()
    recorded = list_versions(registry.models_dir)
    version = publish(load_state(candidate.state_dir), candidate.work / "models", config,
                      number=registry.next_number(), index=index,
                      previous=registry.versions_dir / recorded[-1] if recorded else None)
    candidate.version_dir = str(version)
    candidate.seconds["export"] = time.perf_counter() - start
    return candidate


def monitor(candidate: Candidate, config: MonitoringConfig) -> Candidate:
    """The Evidently report of an increment (drift, code health, forgetting). An append trains
    nothing, so there is no forgetting to report."""
    if candidate.kind != "increment":
        return candidate
    from lifelong_hashing.operations.monitoring import monitor_state, stage_report_name

    start = time.perf_counter()
    out = candidate.work / "monitoring" / stage_report_name(candidate.stage)
    report = monitor_state(load_state(candidate.state_dir), config, out_dir=out, to_workspace=False)
    candidate.monitor_dir, candidate.alerts, candidate.warnings = str(out), report.alerts, report.warnings
    candidate.seconds["monitor"] = time.perf_counter() - start
    return candidate


def record(candidate: Candidate, registry: Registry, params: Params) -> str:
    """Move the candidate into the workspace and record it as a version (DVC commit, push, git
    commit and tag). On any failure the last committed version is restored. Returns the tag."""
    version = Path(candidate.version_dir)
    number = version_number(version.name)
    registry.begin(number, _tree_bytes(candidate.work) + candidate.arrival.size)
    try:
        shutil.rmtree(registry.state_dir, ignore_errors=True)
        shutil.move(candidate.state_dir, registry.state_dir)
        shutil.move(timings_path(candidate.state_dir), timings_path(registry.state_dir))  # git, not DVC
        registry.versions_dir.mkdir(parents=True, exist_ok=True)
        shutil.move(version, registry.versions_dir / version.name)
        if candidate.erased:
            from lifelong_hashing.operations.erasure import erase_kept_copies

            erase_kept_copies(registry, params, candidate.erased, version.name)
        else:
            _keep_batch_and_reports(candidate, registry, params)
        write_metrics(registry, recorded_history(registry), version.name, candidate.method)
        write_text(registry.root / "params.yaml", yaml.safe_dump(params.model_dump(), sort_keys=False))
        _add_to_manifest(candidate, registry, version.name, number)
        tag = registry.record(number, _commit_message(candidate, version.name), params.pipeline.push_retries)
    except BaseException:
        registry.restore()
        registry.finish()
        raise
    registry.finish()
    shutil.rmtree(candidate.work, ignore_errors=True)
    return tag


def _keep_batch_and_reports(candidate: Candidate, registry: Registry, params: Params) -> None:
    """A batch's data contract (the suite it met), its validation and monitoring reports, and its
    bytes, into the workspace."""
    contract = candidate.work / "contract" / CONTEXT_DIR
    if contract.is_dir():
        shutil.rmtree(registry.contract_dir, ignore_errors=True)
        shutil.move(contract, registry.contract_dir)
    _move_tree(Path(candidate.validation_dir), registry.validation_reports_dir(candidate.arrival.key))
    if candidate.monitor_dir:
        target = registry.monitoring_report_dir(candidate.stage)
        _move_tree(Path(candidate.monitor_dir), target)
        from lifelong_hashing.operations.monitoring import SNAPSHOT_FILE, add_to_workspace

        add_to_workspace(target, registry.evidently_workspace, params.monitoring.project)
        (target / SNAPSHOT_FILE).unlink()  # the workspace holds it now; no second 20 MB copy
    registry.batches_dir.mkdir(exist_ok=True)
    shutil.copyfile(candidate.arrival.pinned, registry.batches_dir / f"{candidate.arrival.key}.npz")
    if candidate.discovery is not None:
        from lifelong_hashing.operations.discovery import report_path

        write_json(report_path(registry.reports_dir, Path(candidate.version_dir).name), candidate.discovery)


def _add_to_manifest(candidate: Candidate, registry: Registry, version: str, number: int) -> None:
    """What was processed, by content hash: batches under ``batches``, deletion requests under
    ``deletions`` (counts only: a request's ids are not kept)."""
    manifest = read_manifest(registry)
    section = manifest.setdefault(DELETIONS_KEY if candidate.kind == "deletion" else MANIFEST_KEY, {})
    section[candidate.arrival.sha256] = {
        "name": candidate.arrival.name, "version": version, "tag": version_tag(number),
        "kind": candidate.kind, "stage": candidate.stage, "items": candidate.items,
        "new_categories": candidate.new_categories, **({"replaced": candidate.replaced} if candidate.replaced else {}),
        "processed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(registry.manifest_path, manifest)


def _commit_message(candidate: Candidate, version: str) -> str:
    what = "erasure" if candidate.kind == "deletion" else candidate.kind
    return (f"{version}: {what} of {printable(candidate.arrival.name)} ({candidate.items} items"
            + (f", new categories {', '.join(candidate.new_categories)}" if candidate.new_categories else "") + ")")


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def promote(registry: Registry, version: str) -> None:
    """Assign ``prod`` to ``version`` and serve it (it loads and encodes a test input first)."""
    registry.serve(version_number(version))


def retire(arrival: Arrival) -> bool:
    """Take a batch out of the incoming folder once it is recorded or quarantined (its bytes live
    on there), unless the file there is no longer the one pinned: new content is left for the
    next run. Whether it was removed."""
    if not arrival.unchanged():
        return False
    arrival.path.unlink(missing_ok=True)
    return True


def summary_markdown(candidate: Candidate, metrics: dict, tag: str, version: str) -> str:
    """The Prefect artifact of a promoted version: batch, mAP before and after, forgetting, seconds."""
    new = ", ".join(map(markdown_text, candidate.new_categories))
    what = (f"- items erased: {candidate.items} (codes, memory, kept batches, reference samples; the version "
            "folders before this one are removed)" if candidate.kind == "deletion" else
            f"- items: {candidate.items}; stage {candidate.stage}; new categories: "
            f"{new or 'none (known categories, codes appended, no training)'}"
            + (f"; {candidate.replaced} of them replaced stored items" if candidate.replaced else ""))
    lines = [f"# {version} ({tag}): {candidate.kind} of {markdown_text(candidate.arrival.name)}", "", what,
             f"- sha256: `{candidate.arrival.sha256}`", "",
             "| direction | mAP before | mAP after | mean forgetting |", "|---|---|---|---|"]
    for key, direction in DIRECTIONS.items():
        before = f"{candidate.before[key]:.4f}" if candidate.before else "-"
        after, forgot = candidate.after[key], metrics[key]["mean_forgetting"]
        lines.append(f"| {direction.name} | {before} | {after:.4f} | {forgot:.4f} |")
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in candidate.seconds.items())]
    if candidate.shards_on_dask or candidate.query_shards_on_dask:
        lines.append(f"- on Dask: {candidate.shards_on_dask} shards encoded, {candidate.query_shards_on_dask} "
                     "query shards scored")
    if candidate.discovery:
        found = candidate.discovery
        lines += ["", f"- novelty: {found['flagged']} of {found['unlabelled']} unlabelled items flagged "
                      f"({found['share']:.1%}), {len(found['proposals'])} proposals (reports/discovery)"]
    lines += [f"- warning: {markdown_text(w)}" for w in candidate.warnings]
    lines += [f"- alert: {markdown_text(a)}" for a in candidate.alerts]
    return "\n".join(lines)


def stage_task_rows(metrics: dict) -> list[dict]:
    """The stage×task mAP matrices as table rows (a Prefect table artifact)."""
    return [{"direction": key, "after stage": t,
             **{f"task {j}": (None if v is None else round(v, 4)) for j, v in enumerate(row)}}
            for key in DIRECTIONS for t, row in enumerate(metrics[key]["matrix"])]


def rejection_markdown(arrival: Arrival, kind: str, reason: str, kept_in: Path) -> str:
    return (f"# Batch quarantined ({kind}): {markdown_text(arrival.name)}\n\n- sha256: `{arrival.sha256}`\n"
            f"- reason: {markdown_text(reason)}\n"
            f"- kept in: {markdown_text(str(kept_in))} (the batch, its reports and reason.json)\n")


def _move_tree(src: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(src, dest)


def recorded_history(registry: Registry) -> list[dict]:
    """The stage records of the workspace's state, read without loading the model."""
    return json.loads((registry.state_dir / "state.json").read_text())["history"]


def recorded_summary(registry: Registry) -> dict:
    """The workspace's history summary with its training seconds (``timings.json``, in git)."""
    timings = timings_path(registry.state_dir)
    return history_summary(recorded_history(registry), json.loads(timings.read_text()) if timings.exists() else None)


def write_metrics(registry: Registry, history: list[dict], version: str, method: str) -> None:
    """metrics.json (what ``dvc metrics show`` reads) and the per-task mAP plot data."""
    summary = history_summary(history)
    metrics = {"version": version, "method": method, "stages": len(history),
               "database_size": history[-1]["database_size"]}
    for d in DIRECTIONS:
        s = summary[d]
        metrics[d] = {"final_average_map": s["final_average_map"], "mean_forgetting": s["mean_forgetting"],
                      "backward_transfer": s["backward_transfer"], "matrix": s["matrix"]}
    write_json(registry.metrics_path, metrics)
    write_plots(summary, registry.plots_dir)
