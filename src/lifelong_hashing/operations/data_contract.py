"""The data contract a batch must meet, as a Great Expectations suite in a File Data Context.

In the pipeline workspace the context is ``gx/`` (git, beside the model it guards): the suite
``expectations/incoming_batch.json``, its validation definition and checkpoint, each a file a
person can review, diff and version with the model (the workspace's commit of each version
holds them). What depends on the model (its feature shapes, how many labels an item may carry)
is a run-time parameter of the suite (``{"$PARAMETER": ...}``), given at each validation by
``suite_parameters``; what depends on params.yaml (row limits, the out-of-range share) is
written in. So the suite file changes only when the contract does: a run rewrites it only if
its expectations differ from the stored ones.

Validation results name items, so the context keeps them in memory, never on disk; a batch's
data docs go to its own report folder (DVC-versioned, reached by erasure), and the suite's own
data docs (the expectations, no items) are built in ``gx/uncommitted/data_docs``. Without a
workspace (``lhash validate`` on a file) the same suite runs in an ephemeral context.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from string import Template

import yaml

from lifelong_hashing.config import ValidationConfig
from lifelong_hashing.files import write_text

SUITE = "incoming_batch"
CONTEXT_DIR = "gx"
BATCH_SITE = "batch"  # the per-batch data docs site, configured in memory for each run


def data_context(root: Path | None):
    """The File Data Context under ``root/gx`` (created on first use), or an ephemeral one."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # no network at run time
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    if root is None:
        context = gx.get_context(mode="ephemeral")
    else:
        config = Path(root) / CONTEXT_DIR / "great_expectations.yml"
        fresh = not config.exists()
        context = gx.get_context(mode="file", project_root_dir=str(root))
        if fresh:
            _keep_results_in_memory(config)
            context = gx.get_context(mode="file", project_root_dir=str(root))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def _keep_results_in_memory(config: Path) -> None:
    """Validation results list items by id: they stay in the process (erasure reaches files)."""
    settings = yaml.safe_load(config.read_text())
    settings["stores"]["validation_results_store"]["store_backend"] = {"class_name": "InMemoryStoreBackend"}
    write_text(config, yaml.safe_dump(settings, sort_keys=False))


def stored_suite(context, expectations: list):
    """The suite of ``expectations`` as the context keeps it: the stored one when its
    expectations say the same (its file untouched), else stored with these."""
    import great_expectations as gx

    try:
        stored = context.suites.get(SUITE)
    except Exception:  # noqa: BLE001 - GX raises DataContextError subclasses for a missing suite
        return context.suites.add(gx.ExpectationSuite(name=SUITE, expectations=expectations))
    if _said(stored.expectations) == _said(expectations):
        return stored
    stored.expectations = []
    for expectation in expectations:
        stored.add_expectation(expectation)
    stored.save()
    return stored


def _said(expectations: list) -> list[str]:
    """What each expectation says, as the store writes it (numbers as floats, no ids)."""
    return [json.dumps(_as_stored({"type": e.expectation_type, "kwargs": e.configuration.kwargs,
                                   "description": e.description}), sort_keys=True) for e in expectations]


def _as_stored(value):
    if isinstance(value, dict):
        return {k: _as_stored(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_as_stored(v) for v in value]
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def checkpoint(context, suite, docs: Path):
    """The validation definition and checkpoint of ``suite`` (saved once), with the per-batch
    data docs site pointed at ``docs`` for this run only."""
    import great_expectations as gx

    try:
        found = context.checkpoints.get(SUITE)
    except Exception:  # noqa: BLE001 - missing: created below
        source = context.data_sources.add_or_update_pandas("incoming")
        asset = source.add_dataframe_asset("items")
        definition = context.validation_definitions.add(gx.ValidationDefinition(
            name=SUITE, data=asset.add_batch_definition_whole_dataframe("all_items"), suite=suite))
        found = context.checkpoints.add(gx.Checkpoint(
            name=SUITE, validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[BATCH_SITE])],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["id"]}))
    # After anything that saves the context's config: this site is the run's, never written there.
    context.variables.data_docs_sites = {**(context.variables.data_docs_sites or {}), BATCH_SITE: {
        "class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs.resolve())}}}
    return found


def build_suite_docs(context) -> None:
    """The suite's data docs (before any validation ran in this context: no items in them)."""
    sites = context.variables.data_docs_sites or {}
    if "local_site" in sites:
        context.build_data_docs(site_names=["local_site"])


def describe(description: str, parameters: dict) -> str:
    """A description with the run's parameter values in place of ``$name``."""
    return Template(description).safe_substitute({k: _shown(v) for k, v in parameters.items()})


def _shown(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def suite_parameters(expected, config: ValidationConfig, n_categories: int) -> dict:
    """The values the suite takes from the current model (and, before there is one, the batch)."""
    parameters = {"max_labels": config.max_labels_per_item or expected.reference.max_labels or n_categories}
    if expected.image_shape is not None:
        parameters["image_shape"] = ["x".join(map(str, expected.image_shape))]
        parameters["text_shape"] = [str(expected.text_dim)]
    return parameters


def build_expectations(expected, config: ValidationConfig) -> list:
    """The suite's expectations for a model like ``expected``: which checks apply depends on
    what the model has (photos, trained shapes, a reference sample); the values it learned are
    parameters. (A list, not a suite: GX saves a suite named like a stored one as it is built.)"""
    import great_expectations.expectations as gxe

    return [*_item_checks(gxe, config, expected.updates), *_model_checks(gxe, expected, config)]


def _item_checks(gxe, config: ValidationConfig, updates: bool) -> list:
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=config.min_rows, max_value=config.max_rows,
                                           description=f"row count within {config.min_rows}..{config.max_rows}"),
        gxe.ExpectColumnValuesToNotBeNull(column="id", description="every item has an id"),
        gxe.ExpectColumnValuesToBeNull(column="id_problem", description="ids are canonical (NFC, no leading or "
                                                                        "trailing whitespace, no control or "
                                                                        "zero-width characters)"),
        gxe.ExpectColumnValuesToBeUnique(column="id_key",
                                         description="ids are unique within the batch, also after case-folding"),
        gxe.ExpectColumnValuesToBeNull(column="id_in_database",
                                       description="ids are new to the database, also after case-folding "
                                                   "(the value: the stored id it collides with)" +
                                                   ("; an id stored exactly as sent is an update" if updates else "")),
        gxe.ExpectColumnValuesToBeBetween(
            column="image_nonfinite", min_value=0, max_value=0,
            description="image features are finite as float32 (no NaN, inf or |x| > 3.4e38)"),
        gxe.ExpectColumnValuesToBeBetween(
            column="text_nonfinite", min_value=0, max_value=0,
            description="text features are finite as float32 (no NaN, inf or |x| > 3.4e38)"),
        gxe.ExpectColumnValuesToBeBetween(column="label_non_binary", min_value=0, max_value=0,
                                          description="labels are binary (0/1)"),
        gxe.ExpectColumnValuesToBeBetween(column="label_count", min_value=1, max_value={"$PARAMETER": "max_labels"},
                                          description="every labelled item has 1..$max_labels labels"),
        gxe.ExpectColumnValuesToBeBetween(column="unlabelled_label_count", min_value=0, max_value=0,
                                          description="items marked unlabelled (labelled=False) carry no labels"),
        gxe.ExpectColumnValuesToBeNull(column="undeclared_categories",
                                       description="label names are known or declared new in the batch"),
    ]


def _model_checks(gxe, expected, config: ValidationConfig) -> list:
    checks = []
    if expected.photos is not None:
        limits = expected.photos.limits
        checks.append(gxe.ExpectColumnValuesToBeNull(
            column="image_problem", description=f"photos are JPEG or PNG files of at most {limits.max_file_bytes:,} "
                                                f"bytes and {limits.max_pixels:,} pixels that decode whole"))
    if expected.image_shape is not None:
        checks.append(gxe.ExpectColumnValuesToBeInSet(column="image_shape", value_set={"$PARAMETER": "image_shape"},
                                                      description="image features have the model's shape "
                                                                  "$image_shape"))
        checks.append(gxe.ExpectColumnValuesToBeInSet(column="text_shape", value_set={"$PARAMETER": "text_shape"},
                                                      description="text features have the model's $text_shape "
                                                                  "dimensions"))
    if not expected.reference.empty:
        for m in ("image", "text"):
            checks.append(gxe.ExpectColumnValuesToBeBetween(
                column=f"{m}_out_of_range", min_value=0, max_value=config.max_out_of_range_share,
                description=f"{m} features within the reference range (± {config.range_tolerance:g} × range) "
                            f"in all but {config.max_out_of_range_share:.0%} of dimensions"))
    return checks


def run_suite(frame, parameters: dict, expected, config: ValidationConfig, out: Path, root: Path | None):
    """Validate ``frame`` (one summary row per item) through the contract's checkpoint; the
    batch's data docs go under ``out/docs``. Returns the suite's validation result."""
    context = data_context(root)
    suite = stored_suite(context, build_expectations(expected, config))
    if root is not None:
        build_suite_docs(context)
    run = checkpoint(context, suite, out / "docs").run(batch_parameters={"dataframe": frame},
                                                      expectation_parameters=parameters)
    return next(iter(run.run_results.values()))
