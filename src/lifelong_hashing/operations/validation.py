"""Is an incoming batch fit to train on? The data contract's Great Expectations suite
(``data_contract``) over one summary row per item, with the current model's values as its
parameters.

The batch file is read raw, so that every defect (NaN, a wrong dimension, non-binary labels, ...)
is counted per item and reported together instead of stopping at the first; features are cast to
float32 first, as training casts them. A batch that passes the suite is then built exactly as
training loads it (``batch.load_batch``: the same reader, size limits and checks), so nothing
validation accepts can fail to load later. High-dimensional features are summarized per item
(shape, non-finite count, share of dimensions outside the range seen in training), which keeps
the suite small and its report readable at 1,000+ dimensions. The answer is a
``ValidationResult``: accepted or rejected, with every failed expectation, how many items it hit
and example ids. Nothing is used from a batch that fails.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from lifelong_hashing.config import ValidationConfig
from lifelong_hashing.engine.batch import (
    Batch,
    BatchError,
    batch_from_arrays,
    name_key,
    name_problem,
    read_batch_arrays,
    shown,
)
from lifelong_hashing.engine.images import PhotoReader, read_batch_photos
from lifelong_hashing.engine.reference import ReferenceProfile, flat_features
from lifelong_hashing.files import sha256_of, write_text
from lifelong_hashing.operations.data_contract import describe, run_suite, suite_parameters

_EXAMPLES = 5


@dataclass(frozen=True)
class Failure:
    expectation: str  # GX expectation type, or "batch_structure" when no per-item check was possible
    field: str  # the summary column or batch field
    description: str
    rows: int  # items that break it (0 for batch-level checks)
    examples: list[str] = field(default_factory=list)  # "id: value" for the first few items

    def line(self, total: int) -> str:
        where = f" ({self.rows} of {total} items)" if self.rows else ""
        examples = f"; e.g. {', '.join(self.examples)}" if self.examples else ""
        return f"{self.description} [{self.expectation} on '{self.field}']{where}{examples}"


@dataclass(frozen=True)
class ValidationResult:
    source: str
    sha256: str
    accepted: bool
    rows: int
    known_categories: list[str]  # of the batch's categories, those the model knows
    new_categories: list[str]  # declared new and carrying no undeclared names
    failures: list[Failure]
    expectations: int  # how many were evaluated
    json_path: str | None = None
    html_path: str | None = None
    batch: Batch | None = field(default=None, repr=False, compare=False)  # accepted: as training reads it
    photos: tuple[bytes, ...] = field(default=(), repr=False, compare=False)  # a few of its photos, encoded

    @property
    def reason(self) -> str:
        return "; ".join(f.description for f in self.failures) or "all expectations met"

    def summary(self) -> str:
        head = (f"{self.source}: {'ACCEPTED' if self.accepted else 'REJECTED'} ({self.rows} items, "
                f"{self.expectations - len(self.failures)}/{self.expectations} expectations met)")
        lines = [head] + [f"  ✗ {f.line(self.rows)}" for f in self.failures]
        if self.accepted:
            lines.append(f"  new categories: {self.new_categories or 'none (known categories only)'}")
        lines += [f"  {k}: {v}" for k, v in (("result", self.json_path), ("report", self.html_path)) if v]
        return "\n".join(lines)


@dataclass(frozen=True)
class BatchExpectations:
    """What the current model expects of a batch; ``none`` before the first stage is trained.
    ``photos``: how the model reads photos (None: it takes image features). ``updates``: an id
    stored exactly as sent is an update of that item (``pipeline.repeated_ids: replace``), not a
    collision; a different id that only case-folds to a stored one still is. ``unlabelled``: the
    ids stored without labels; one sent again with labels is that item labelled (an update under
    either rule: how a named discovery proposal, or a late label, reaches the model)."""

    image_shape: tuple[int, ...] | None
    text_dim: int | None
    known_categories: tuple[str, ...]
    database_ids: np.ndarray
    reference: ReferenceProfile
    photos: PhotoReader | None = None
    updates: bool = False
    unlabelled: frozenset[str] = frozenset()

    @staticmethod
    def none(photos: PhotoReader | None = None) -> BatchExpectations:
        return BatchExpectations(None, None, (), np.empty(0, str), ReferenceProfile(), photos)

    @staticmethod
    def from_state(state, repeated_ids: str = "reject") -> BatchExpectations:
        m = state.method
        store = state.store
        return BatchExpectations(m.image_shape, m.text_dim, tuple(m.categories), store.ids, state.reference,
                                 PhotoReader.from_params(state.params), updates=repeated_ids == "replace",
                                 unlabelled=frozenset(store.ids[~store.labelled].tolist()))


def validate_batch(path: str | Path, expected: BatchExpectations, config: ValidationConfig,
                   out_dir: str | Path | None = None, sha256: str | None = None,
                   source: str | None = None, context_root: str | Path | None = None) -> ValidationResult:
    """Run the data contract's suite on a batch file; with ``out_dir``, write ``validation.json``
    and the GX data docs there (a folder per batch content hash, under ``config.reports_dir`` by
    default). ``context_root``: the folder of the File Data Context (``gx/``: the pipeline's
    workspace); without one the suite runs in an ephemeral context.
    ``sha256``: the file's content hash when the caller has it already; ``source``: the name to
    report it by (default: the path). An accepted result carries the batch it loaded, so that
    the bytes validated are the bytes trained on, read once."""
    path = Path(path)
    source = source or str(path)
    try:
        sha = sha256 or sha256_of(path)
    except OSError:
        sha = "0" * 64  # unreadable: read_npz below says why
    out = Path(out_dir) if out_dir else Path(config.reports_dir) / f"{_safe_stem(path)}-{sha[:12]}"
    try:
        arrays = read_batch_arrays(path, config.max_rows, config.max_bytes, config.max_categories)
        arrays, photo_problems, photos = _photos_as_features(arrays, expected.photos, source)
    except BatchError as err:
        result = ValidationResult(source, sha, False, 0, [], [],
                                  [Failure("batch_structure", err.field, err.problem, 0)], 1)
        return _write(result, out, None)
    structural = _structure_failures(arrays)
    if structural:
        n = len(arrays["ids"]) if arrays["ids"].ndim == 1 else 0
        return _write(ValidationResult(source, sha, False, n, [], [], structural, len(structural)), out, None)
    frame, categories = _item_frame(arrays, expected, config.range_tolerance)
    frame["image_problem"] = photo_problems
    failures, evaluated, html = _run_suite(frame, len(categories), expected, config, out,
                                           Path(context_root) if context_root else None)
    declared = [str(c) for c in arrays.get("new_categories", np.empty(0, str)).tolist()]
    failures += _batch_failures(arrays, categories, declared, expected, config.max_categories)
    evaluated += BATCH_CHECKS
    batch = None
    if not failures:
        evaluated += 1
        try:  # exactly what training will do with the file
            batch = batch_from_arrays(arrays, source)
            batch.for_model(expected.known_categories)
        except BatchError as err:
            failures.append(Failure("batch_structure", err.field, err.problem, 0))
            batch = None
    result = ValidationResult(
        source, sha, not failures, len(frame), [c for c in categories if c in expected.known_categories],
        [c for c in categories if c in declared and c not in expected.known_categories], failures, evaluated,
        batch=batch, photos=photos if batch is not None else ())
    return _write(result, out, html)


def _photos_as_features(arrays: dict[str, np.ndarray], reader: PhotoReader | None, source: str):
    """The arrays with any photos read into backbone features, each row's decoding problem (None:
    it decoded; a failed photo is counted by the suite, not raised) and a few encoded photos."""
    if reader is None:
        arrays, _ = read_batch_photos(arrays, None, source)  # refuses photo files
        return arrays, [None] * len(arrays["ids"]), ()
    if arrays["ids"].ndim != 1:
        raise BatchError(source, "ids", f"expected 1-D, got shape {arrays['ids'].shape}")
    return reader.batch_arrays(arrays, source)


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)[:64] or "batch"


def _structure_failures(a: dict[str, np.ndarray]) -> list[Failure]:
    """Defects that leave no per-item view: wrong ranks, misaligned rows, unusable dtypes."""
    problems = []
    ranks = {"ids": (1,), "image": (2, 4), "text": (2,), "labels": (2,), "categories": (1,)}
    for name, allowed in ranks.items():
        if a[name].ndim not in allowed:
            problems.append((name, f"expected {' or '.join(map(str, allowed))}-D, got shape {a[name].shape}"))
    for name in ("image", "text", "labels"):
        if a[name].dtype.kind not in "biuf":
            problems.append((name, f"expected numbers, got dtype {a[name].dtype}"))
    if not problems:
        n = len(a["ids"])
        problems += [(k, f"{len(a[k])} rows but {n} ids") for k in ("image", "text", "labels") if len(a[k]) != n]
        if a["labels"].shape[1] != len(a["categories"]):
            problems.append(("labels", f"{a['labels'].shape[1]} columns but {len(a['categories'])} categories"))
        if len(set(a["categories"].tolist())) != len(a["categories"]):
            problems.append(("categories", "category names repeat"))
        if "labelled" in a and (a["labelled"].dtype != bool or a["labelled"].shape != (n,)):
            problems.append(("labelled", f"expected ({n},) booleans, got {a['labelled'].shape} {a['labelled'].dtype}"))
        if n == 0:
            problems.append(("ids", "empty batch (0 rows)"))
    return [Failure("batch_structure", f, p, 0) for f, p in problems]


BATCH_CHECKS = 6  # the checks of _batch_failures, counted among the expectations


def _batch_failures(a: dict[str, np.ndarray], categories: list[str], declared: list[str],
                    expected: BatchExpectations, max_categories: int) -> list[Failure]:
    """Checks of the batch as a whole: its declarations must agree with its columns and the model,
    a new category must be carried by a labelled item (or nothing could learn it), names must be
    canonical and distinct from the known ones after case-folding, and the model may not grow
    past ``max_categories``."""
    problems = _category_name_problems(categories, expected.known_categories)
    grown = len(set(expected.known_categories) | set(declared))
    if grown > max_categories:
        problems.append(("new_categories", f"the model would know {grown:,} categories, over the limit of "
                                           f"{max_categories:,} (validation.max_categories)"))
    carried = (a["labels"][_labelled(a)] != 0).any(axis=0)
    untaught = [c for c, has in zip(categories, carried, strict=True) if c in declared and not has]
    if untaught and not [c for c in declared if c not in categories]:
        problems.append(("new_categories", f"declared new but no labelled item carries them: {untaught}"))
    already = [c for c in declared if c in expected.known_categories]
    if already:
        problems.append(("new_categories", f"declared new but already known to the model: {already}"))
    absent = [c for c in declared if c not in categories]
    if absent:
        problems.append(("new_categories", f"declared new but not among the batch's categories: {absent}"))
    return [Failure("batch_structure", f, p, 0) for f, p in problems]


def _category_name_problems(categories: list[str], known: tuple[str, ...]) -> list[tuple[str, str]]:
    """Non-canonical category names, and names that collide after case-folding with a known one
    or with each other (each collision names both)."""
    odd = [f"{shown(c)} ({why})" for c in categories if (why := name_problem(c))]
    problems = [("categories", f"names not canonical: {'; '.join(odd[:5])}")] if odd else []
    seen = {name_key(k): k for k in known}
    clashes = []
    for c in categories:
        other = seen.setdefault(name_key(c), c)
        if other != c:
            clashes.append(f"{shown(c)} and {shown(other)}")
    if clashes:
        problems.append(("categories", f"names that differ only in case or form: {'; '.join(clashes[:5])}"))
    return problems


def _item_frame(a: dict[str, np.ndarray], expected: BatchExpectations, tolerance: float):
    """One summary row per item: the columns the suite checks."""
    import pandas as pd

    ids = a["ids"].astype(str)
    categories = [str(c) for c in a["categories"].tolist()]
    declared = {str(c) for c in a.get("new_categories", np.empty(0, str)).tolist()}
    frame = pd.DataFrame({"id": [i if i else None for i in ids]})
    frame["id_problem"] = [name_problem(i) for i in ids]
    keys = [name_key(i) for i in ids]
    frame["id_key"] = keys
    stored = {name_key(i): i for i in expected.database_ids.tolist()} if len(expected.database_ids) else {}
    update = [stored.get(k) == i and (expected.updates or (i in expected.unlabelled and labelled))
              for k, i, labelled in zip(keys, ids, _labelled(a), strict=True)]
    frame["id_in_database"] = [shown(stored[k], 40, quoted=False) if k in stored and not same else None
                               for k, same in zip(keys, update, strict=True)]
    for modality in ("image", "text"):
        with np.errstate(over="ignore"):  # beyond float32's range becomes inf: counted as non-finite
            x = np.asarray(a[modality], dtype=np.float32)
        flat = flat_features(x)
        frame[f"{modality}_shape"] = "x".join(map(str, x.shape[1:]))
        finite = np.isfinite(flat)
        frame[f"{modality}_nonfinite"] = (~finite).sum(axis=1)
        frame[f"{modality}_out_of_range"] = _out_of_range_share(flat, finite, modality, expected, tolerance)
    labels, labelled = a["labels"], _labelled(a)
    frame["label_non_binary"] = (~np.isin(labels, (0, 1))).sum(axis=1)
    count = (labels != 0).sum(axis=1)
    frame["label_count"] = np.where(labelled, count, np.nan)  # NaN: unlabelled, checked below
    frame["unlabelled_label_count"] = np.where(labelled, 0, count)
    unknown = np.array([c not in expected.known_categories and c not in declared for c in categories], bool)
    names = np.array(categories, dtype=object)
    frame["undeclared_categories"] = [
        ",".join(names[unknown & (row != 0)]) or None for row in labels]
    return frame, categories


def _labelled(a: dict[str, np.ndarray]) -> np.ndarray:
    """Which rows are labelled: the file's ``labelled`` field, or every row without one."""
    return a["labelled"] if "labelled" in a else np.ones(len(a["ids"]), bool)


def _out_of_range_share(flat, finite, modality: str, expected: BatchExpectations,
                        tolerance: float) -> np.ndarray:
    """Share of an item's dimensions outside the reference range widened by the tolerance; NaN
    where there is no reference or the dimension differs (another expectation reports that)."""
    ref = expected.reference.ranges.get(modality)
    if ref is None or ref[0].shape[0] != flat.shape[1]:
        return np.full(len(flat), np.nan)
    lo, hi = ref
    slack = tolerance * (hi - lo)
    with np.errstate(invalid="ignore"):
        outside = ((flat < lo - slack) | (flat > hi + slack)) & finite
    return outside.mean(axis=1)


def _run_suite(frame, n_categories: int, expected: BatchExpectations, config: ValidationConfig, out: Path,
               context_root: Path | None):
    """The data contract's suite on ``frame``: its failures, how many expectations ran, the page."""
    parameters = suite_parameters(expected, config, n_categories)
    suite_result = run_suite(frame, parameters, expected, config, out, context_root)
    failures = [_failure(r, parameters) for r in suite_result.results if not r.success]
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "gx_result.json", json.dumps(suite_result.to_json_dict(), indent=2, default=str))
    pages = sorted((out / "docs" / "validations").rglob("*.html"), key=lambda p: p.stat().st_mtime)
    return failures, len(suite_result.results), str(pages[-1]) if pages else None


def _failure(r, parameters: dict) -> Failure:
    config = r.expectation_config
    column = config.kwargs.get("column", "table")
    result = r.result or {}
    examples = []
    for hit in (result.get("unexpected_index_list") or [])[:_EXAMPLES]:
        if isinstance(hit, dict):
            value = hit.get(column)
            name = shown(hit.get("id"), 40, quoted=False)
            examples.append(f"{name}: {value}" if column not in ("id", "id_key") else name)
    if column == "table":
        examples = [f"observed {result.get('observed_value')}"]
    description = describe(config.description, parameters) if config.description else config.type
    if r.exception_info and r.exception_info.get("raised_exception"):
        description += f" (check raised: {r.exception_info.get('exception_message')})"
    return Failure(config.type, column, description, int(result.get("unexpected_count") or 0), examples)


def _record(result: ValidationResult) -> dict:
    """``validation.json``: everything but the loaded batch and photos."""
    record = {f.name: getattr(result, f.name) for f in fields(result) if f.name not in ("batch", "photos")}
    return {**record, "failures": [asdict(f) for f in result.failures]}


def _write(result: ValidationResult, out: Path, html: str | None) -> ValidationResult:
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "validation.json"
    final = replace(result, json_path=str(json_path), html_path=html)
    write_text(json_path, json.dumps(_record(final), indent=2))
    return final
