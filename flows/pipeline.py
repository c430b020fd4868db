"""The pipeline flow: every batch dropped into the incoming folder becomes a lifelong increment
(new categories) or an append (known ones), a new DVC-versioned model, and, when every step
succeeded, the served version.

    python -m flows.pipeline [--params params.yaml] [-S key=value ...]   # one run, now
    python -m flows.deployment      # the deployment of prefect.yaml: on each arrival, and every 5 minutes

Without ``PREFECT_API_URL`` a run starts Prefect's temporary local server by itself.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from lifelong_hashing.config import Params, add_params_arguments, load_params, parse_overrides
from lifelong_hashing.engine.on_dask import DaskCluster
from lifelong_hashing.operations import discovery, erasure, pipeline
from lifelong_hashing.operations.registry import Registry

STEP = {"cache_policy": NO_CACHE, "persist_result": False}


@task(name="scan incoming", retries=2, retry_delay_seconds=2, **STEP)
def scan(registry: Registry, params: Params) -> tuple[pipeline.Scan, pipeline.Scan]:
    """Deletion requests, then batches."""
    manifest = pipeline.read_manifest(registry)
    (deletions, (suffix, kind)), (incoming, _) = pipeline.arrival_folders(params).items()
    return (pipeline.scan_incoming(deletions, manifest, suffix, pipeline.DELETIONS_KEY, kind),
            pipeline.scan_incoming(incoming, manifest))


@task(name="validate", **STEP)  # no retries: the same bytes get the same verdict
def validate(registry: Registry, arrival: pipeline.Arrival, params: Params):
    return pipeline.validate(registry, arrival, params)


@task(name="quarantine", retries=2, retry_delay_seconds=2, **STEP)
def quarantine(arrival: pipeline.Arrival, params: Params, reason: str, reports: list[Path], kind: str,
               errors: list[str] | None) -> Path:
    return pipeline.quarantine(arrival, params.pipeline.quarantine, reason, reports, kind, errors)


@task(name="train", **STEP)
def train(registry: Registry, arrival: pipeline.Arrival, validation, params: Params,
          cluster: DaskCluster | None = None) -> pipeline.Candidate:
    """With ``cluster``, database codes and the evaluation's scores are computed by shards on Dask."""
    return pipeline.train(registry, arrival, validation, params, cluster)


@task(name="delete items", **STEP)  # no retries: the same request gets the same verdict
def delete(registry: Registry, arrival: pipeline.Arrival, params: Params) -> pipeline.Candidate | None:
    return erasure.delete(registry, arrival, params)


@task(name="export onnx", **STEP)
def export(candidate: pipeline.Candidate, registry: Registry, params: Params) -> pipeline.Candidate:
    return pipeline.export(candidate, registry, params.export, params.serving.index)


@task(name="monitor", **STEP)
def monitor(candidate: pipeline.Candidate, params: Params) -> pipeline.Candidate:
    return pipeline.monitor(candidate, params.monitoring)


@task(name="version (dvc)", **STEP)  # pushing is retried inside, per push_retries
def record(candidate: pipeline.Candidate, registry: Registry, params: Params) -> str:
    return pipeline.record(candidate, registry, params)


@task(name="promote", retries=2, retry_delay_seconds=1, **STEP)
def promote(registry: Registry, version: str) -> None:
    pipeline.promote(registry, version)


@flow(name="lifelong-hashing-pipeline")
def process_incoming(params_path: str = "params.yaml", overrides: dict | None = None) -> list[dict]:
    """Process every new batch in the incoming folder, oldest first; one batch's failure never
    keeps the others from being processed. Ends failed, saying why, when a batch was rejected or
    failed; the served version is then the last one that succeeded."""
    logger = get_run_logger()
    params = load_params(params_path, overrides)
    registry = Registry.from_params(params)
    outcomes = []
    with registry.acquire(params.pipeline.lock_timeout_seconds):
        registry.init()
        recovered = registry.recover()
        if recovered:
            logger.warning("the last run stopped midway: %s", recovered)
        registry.clear_work(keep_pinned=False)  # what a killed run was building
        healed = pipeline.reconcile_serving(registry)
        if healed:
            logger.warning("serving pointed away from the last recorded version; serving %s again", healed)
        requests, found = scan(registry, params)
        for arrival, entry in [*requests.duplicates, *found.duplicates]:
            logger.info("%s was already processed (%s as %s); removing the copy", pipeline.printable(arrival.name),
                        entry.get("tag", "-"), pipeline.printable(str(entry.get("name"))))
            pipeline.retire(arrival)
        for folder, scanned in (("deletions", requests), ("incoming", found)):
            for name, why in scanned.skipped:
                logger.warning("%s: %s skipped: %s", folder, pipeline.printable(name), why)
        cluster = DaskCluster(params.pipeline.dask)  # started only if a batch has work for it
        try:  # takedowns first: they are urgent, and a batch after them may carry the ids again
            for arrival, process in [*((a, process_deletion) for a in requests.pending),
                                     *((a, process_batch) for a in found.pending)]:
                outcome = process(arrival, registry, params, cluster)
                if outcome["status"] == "skipped":
                    logger.warning("%s; left for the next run", outcome["reason"])
                    continue
                outcomes.append(outcome)
                if outcome["status"] != "failed":  # done or quarantined: its failures are history
                    pipeline.forget_attempts(registry, arrival)
        finally:
            cluster.close()
            shutil.rmtree(registry.pinned_dir, ignore_errors=True)
    if not found.pending and not requests.pending:
        logger.info("nothing new in %s or %s", params.pipeline.incoming, params.pipeline.deletions)
    for outcome in outcomes:  # after the lock: a person's answer may take long, other runs go on
        if outcome.get("proposals") and params.pipeline.discovery.ask:
            outcome["named"] = ask_for_names(params_path, overrides, outcome["version"])
    problems = [f"{pipeline.printable(o['file'])}: {o['reason']}" for o in outcomes
                if o["status"] not in ("promoted", "unchanged")]
    if problems:
        raise pipeline.BatchRejected("; ".join(problems))
    return outcomes


def process_batch(arrival: pipeline.Arrival, registry: Registry, params: Params, cluster: DaskCluster) -> dict:
    """Validate, train, export, monitor, record and promote one batch (``attempt``: pinned first,
    and what a failure does)."""
    work = registry.batch_work_dir(arrival.key)
    timed = {"timeout_seconds": params.pipeline.step_timeout_seconds}

    def steps(arrival: pipeline.Arrival) -> dict:
        validation = validate.with_options(**timed)(registry, arrival, params)
        if not validation.accepted:
            reason = "; ".join(f.line(validation.rows) for f in validation.failures)
            return _reject(arrival, params, f"validation failed: {reason}", [work / "validation"],
                           validation_html=validation.html_path)
        on_dask = cluster if params.pipeline.dask.enabled else None
        candidate = train.with_options(**timed)(registry, arrival, validation, params, on_dask)
        candidate = export.with_options(**timed)(candidate, registry, params)
        candidate = monitor.with_options(**timed)(candidate, params)
        if candidate.alerts and params.pipeline.block_on_alerts:
            reports = [Path(candidate.validation_dir), Path(candidate.monitor_dir)]
            return _reject(arrival, params, "monitoring alerts: " + "; ".join(candidate.alerts), reports)
        return record_and_promote(candidate, registry, params)

    return attempt(arrival, registry, params, steps)


def process_deletion(arrival: pipeline.Arrival, registry: Registry, params: Params, cluster=None) -> dict:
    """Erase the items a deletion request names, export, record (purging kept copies) and
    promote; a request whose ids were all deleted before changes nothing."""
    timed = {"timeout_seconds": params.pipeline.step_timeout_seconds}

    def steps(arrival: pipeline.Arrival) -> dict:
        candidate = delete.with_options(**timed)(registry, arrival, params)
        if candidate is None:
            pipeline.retire(arrival)
            get_run_logger().info("%s: every id was deleted before; nothing changed", pipeline.printable(arrival.name))
            return {"status": "unchanged", "file": arrival.name, "kind": "deletion"}
        return record_and_promote(export.with_options(**timed)(candidate, registry, params), registry, params)

    return attempt(arrival, registry, params, steps)


def attempt(arrival: pipeline.Arrival, registry: Registry, params: Params, steps) -> dict:
    """Pin ``arrival`` and run ``steps`` on the pinned copy. A defect of the file quarantines it
    now; any other failure leaves it for the next run, until it is poison (a run killed on it
    counts: the attempt is counted before the work). A file that changed since the scan is
    skipped, for the next run to see as it is then."""
    logger = get_run_logger()
    work = registry.batch_work_dir(arrival.key)
    try:
        earlier = pipeline.start_attempt(registry, arrival)
        arrival = pipeline.pin(registry, arrival)
        if len(earlier) >= params.pipeline.max_attempts:
            return _reject(arrival, params, f"poison: failed {len(earlier)} runs; last: {earlier[-1]}", [],
                           kind="poison", errors=earlier)
        return steps(arrival)
    except pipeline.ArrivalChanged as why:
        pipeline.forget_attempts(registry, arrival)
        return {"status": "skipped", "file": arrival.name, "reason": str(why)}
    except Exception as error:  # noqa: BLE001 - every failure is this file's outcome; the run goes on
        if pipeline.is_batch_defect(error):
            return _reject(arrival, params, f"defect: {error}", [work / "validation"], kind="defect")
        errors = pipeline.count_failure(registry, arrival, error)
        if len(errors) >= params.pipeline.max_attempts:
            return _reject(arrival, params, f"poison: failed {len(errors)} runs; last: {errors[-1]}",
                           [work / "validation"], kind="poison", errors=errors)
        logger.error("%s failed (attempt %d of %d), kept for the next run: %s: %s",
                     pipeline.printable(arrival.name), len(errors), params.pipeline.max_attempts,
                     type(error).__name__, error)
        return {"status": "failed", "file": arrival.name, "attempts": len(errors),
                "reason": f"failed (attempt {len(errors)} of {params.pipeline.max_attempts}, kept for the next "
                          f"run): {type(error).__name__}: {error}"}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def record_and_promote(candidate: pipeline.Candidate, registry: Registry, params: Params) -> dict:
    """Record the candidate as a version, serve it, retire its file, publish its artifacts."""
    tag = record(candidate, registry, params)
    version = Path(candidate.version_dir).name
    promote(registry, version)
    if not pipeline.retire(candidate.arrival):
        get_run_logger().warning("%s changed while it was processed; the new content is left for the next run",
                                 pipeline.printable(candidate.arrival.name))
    publish_artifacts(candidate, registry, tag, version)
    return {"status": "promoted", "file": candidate.arrival.name, "kind": candidate.kind, "stage": candidate.stage,
            "version": version, "tag": tag, "new_categories": candidate.new_categories,
            "shards_on_dask": candidate.shards_on_dask, "query_shards_on_dask": candidate.query_shards_on_dask,
            "items": candidate.items,
            "flagged": (candidate.discovery or {}).get("flagged", 0),
            "proposals": (candidate.discovery or {}).get("proposals", [])}


class CategoryNames(RunInput):
    """The form a person answers: one decision per proposal."""

    answers: list[discovery.ProposalAnswer]


@flow(name="name new categories")
def name_new_categories(params_path: str, overrides: dict | None, version: str) -> dict:
    """Show ``version``'s proposals and wait for a person's answer (a Prefect input form); the
    accepted groups become a new-category batch in the incoming folder, which the next run
    learns. Unanswered within ``answer_timeout_seconds``: this run fails, and nothing is lost
    (the proposals stay in ``reports/discovery``, the items stay stored unlabelled)."""
    params = load_params(params_path, overrides)
    registry = Registry.from_params(params)
    report = discovery.read_report(registry, version)
    markdown = discovery.proposals_markdown(report, version)
    create_markdown_artifact(key="category-proposals", markdown=markdown, description=f"{version}: name them")
    form = CategoryNames.with_initial_data(description=markdown, answers=[
        discovery.ProposalAnswer(proposal=p["number"]) for p in report["proposals"]])
    answer = pause_flow_run(wait_for_input=form, timeout=params.pipeline.discovery.answer_timeout_seconds,
                            poll_interval=2)
    groups, batch = discovery.answer_proposals(registry, Path(params.pipeline.incoming), version, answer.answers)
    get_run_logger().info("named %s; %s", {name: len(ids) for name, ids in groups.items()} or "nothing",
                          f"the next run learns {batch}" if batch else "nothing to learn")
    return {"accepted": {name: len(ids) for name, ids in groups.items()}, "batch": str(batch) if batch else None}


def ask_for_names(params_path: str, overrides: dict | None, version: str) -> dict:
    """``name_new_categories`` as a subflow; an unanswered or unusable answer is logged, and the
    run goes on (its batches are recorded and served already)."""
    try:
        return name_new_categories(params_path, overrides, version)
    except Exception as error:  # noqa: BLE001 - a pause timeout or a bad answer loses nothing
        get_run_logger().warning("proposals of %s not named (%s: %s); they stay in reports/discovery/%s.json",
                                 version, type(error).__name__, error, version)
        return {"error": f"{type(error).__name__}: {error}"}


def _reject(arrival, params: Params, reason: str, reports: list[Path], validation_html: str | None = None,
            kind: str = "rejected", errors: list[str] | None = None) -> dict:
    dest = quarantine(arrival, params, reason, reports, kind, errors)
    shown = pipeline.markdown_text(arrival.name)
    create_markdown_artifact(key="rejected-batch", markdown=pipeline.rejection_markdown(arrival, kind, reason, dest),
                             description=f"{pipeline.printable(arrival.name)[:200]} quarantined ({kind})")
    if validation_html:
        page = dest / "validation" / Path(validation_html).relative_to(Path(reports[0]))
        create_link_artifact(key="validation-report", link=page.resolve().as_uri(),
                             link_text=f"Great Expectations report of {shown}")
    return {"status": "rejected", "file": arrival.name, "reason": reason, "quarantine": str(dest)}


def publish_artifacts(candidate: pipeline.Candidate, registry: Registry, tag: str, version: str) -> None:
    """Markdown summary, the stage×task matrix as a table, links to the reports."""
    metrics = pipeline.read_metrics(registry)
    summary = pipeline.summary_markdown(candidate, metrics, tag, version)
    create_markdown_artifact(key="increment-summary", markdown=summary, description=f"{version} summary")
    create_table_artifact(key="stage-task-map", table=pipeline.stage_task_rows(metrics),
                          description="mAP per task (columns) after each stage")
    if candidate.kind == "increment":
        report = registry.monitoring_report_dir(candidate.stage) / "report.html"
        create_link_artifact(key="evidently-report", link=report.as_uri(), link_text=f"Evidently report, {version}")
    docs = sorted(registry.validation_reports_dir(candidate.arrival.key).rglob("index.html"))
    if docs:
        create_link_artifact(key="validation-report", link=docs[0].as_uri(),
                             link_text=f"Great Expectations report of {pipeline.markdown_text(candidate.arrival.name)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_params_arguments(parser)
    args = parser.parse_args(argv)
    state = process_incoming(args.params, parse_overrides(args.set), return_state=True)
    print(f"{state.name}: {state.message or ''}".strip())
    return 0 if state.is_completed() else 1


def exit_now(code: int) -> None:
    """End a finished command at once: its atexit handlers run (Prefect drains its logs and events
    there, logging flushes), then the process exits without Python's finalization, which tears
    down every module and object one by one. With torch, Great Expectations, Evidently and DVC
    loaded that is seconds of a run's budget for nothing a finished command needs
    (bench/results/run_budget.json). Everything the run wrote is committed by then."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
