"""Category-incremental stages (docs/methods.md, "The setting").

Categories are split into ordered groups G0 (base), G1..GT. An item belongs to the stage of the
newest group among its labels. The vocabulary grows in group order, so label column c always
means the same category from the stage that introduced it on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lifelong_hashing.config import StagesConfig
from lifelong_hashing.engine.batch import Batch
from lifelong_hashing.engine.datasets import SplitDataset


class StagePlanError(ValueError):
    pass


@dataclass(frozen=True)
class Stage:
    index: int
    new_categories: tuple[str, ...]
    categories: tuple[str, ...]  # every category known at the end of this stage
    batch: Batch  # D_t, labels over ``categories``


@dataclass(frozen=True)
class StagePlan:
    stages: list[Stage]
    queries: Batch  # labels over the final vocabulary
    query_task: np.ndarray  # (n_queries,) stage that introduced each query's newest label

    @property
    def vocabulary(self) -> tuple[str, ...]:
        return self.stages[-1].categories

    def queries_at(self, t: int) -> tuple[Batch, np.ndarray]:
        """The queries answerable at stage t (all labels known) and their task ids."""
        return queries_by_task(self.queries, [s.new_categories for s in self.stages[: t + 1]])


def queries_by_task(queries: Batch, groups: list[tuple[str, ...]]) -> tuple[Batch, np.ndarray]:
    """The queries whose labels all lie in ``groups`` (the categories each stage introduced),
    labels over those categories in stage order, and the stage of each query's newest label:
    the task it belongs to in the stage×task matrix."""
    known = tuple(c for g in groups for c in g)
    inside = np.isin(np.asarray(queries.categories), known)
    rows = (queries.labels[:, ~inside].sum(axis=1) == 0) & (queries.labels.sum(axis=1) > 0)
    q = queries.subset(rows)
    columns = [q.categories.index(c) if c in q.categories else None for c in known]
    labels = np.zeros((len(q), len(known)), np.uint8)
    for j, c in enumerate(columns):
        if c is not None:
            labels[:, j] = q.labels[:, c]
    group_of_column = np.concatenate([np.full(len(g), i) for i, g in enumerate(groups)])
    return Batch(q.ids, q.image, q.text, labels, known, source=q.source), _newest_group(labels, group_of_column)


def category_groups(names: tuple[str, ...], cfg: StagesConfig) -> list[tuple[str, ...]]:
    if cfg.groups:
        groups = [tuple(g) for g in cfg.groups]
        flat = [c for g in groups for c in g]
        unknown = sorted(set(flat) - set(names))
        if unknown:
            raise StagePlanError(f"stages.groups names unknown categories {unknown}; known: {list(names)}")
        if len(flat) != len(set(flat)):
            raise StagePlanError("stages.groups lists a category twice")
        if any(not g for g in groups):
            raise StagePlanError("stages.groups has an empty group")
        return groups
    order = list(cfg.order) if cfg.order else list(names)
    if sorted(order) != sorted(names):
        raise StagePlanError(f"stages.order must be a permutation of {list(names)}")
    if cfg.base >= len(order):
        raise StagePlanError(f"stages.base={cfg.base} leaves no category for later stages ({len(order)} in all)")
    groups = [tuple(order[: cfg.base])]
    for start in range(cfg.base, len(order), cfg.per_stage):
        groups.append(tuple(order[start: start + cfg.per_stage]))
    return groups


def _restrict(batch: Batch, vocabulary: tuple[str, ...]) -> Batch:
    """Drop label columns outside the plan, then items left without a label; reorder columns."""
    columns = [batch.categories.index(c) for c in vocabulary]
    labels = batch.labels[:, columns]
    keep = labels.sum(axis=1) > 0
    return Batch(batch.ids[keep], batch.image[keep], batch.text[keep], labels[keep], vocabulary,
                 source=batch.source)


def _newest_group(labels: np.ndarray, group_of_column: np.ndarray) -> np.ndarray:
    return np.where(labels.astype(bool), group_of_column[None, :], -1).max(axis=1)


def plan_stages(dataset: SplitDataset, cfg: StagesConfig, seed: int = 0) -> StagePlan:
    groups = category_groups(dataset.database.categories, cfg)
    vocabulary = tuple(c for g in groups for c in g)
    group_of_column = np.concatenate([np.full(len(g), i) for i, g in enumerate(groups)])
    database = _restrict(dataset.database, vocabulary)
    queries = _restrict(dataset.queries.with_categories(dataset.database.categories), vocabulary)
    item_stage = _newest_group(database.labels, group_of_column)
    stages = []
    for t, group in enumerate(groups):
        known = tuple(c for g in groups[: t + 1] for c in g)
        rows = item_stage == t
        if not rows.any():
            raise StagePlanError(f"stage {t} (categories {list(group)}) has no database items")
        b = database.subset(rows)
        batch = Batch(b.ids, b.image, b.text, b.labels[:, : len(known)], known, source=b.source, new_categories=group)
        stages.append(Stage(t, group, known, _hide_labels(batch, cfg.unlabelled_share, [seed, t, 3])))
    return StagePlan(stages, queries, _newest_group(queries.labels, group_of_column))


def _hide_labels(batch: Batch, share: float, seed) -> Batch:
    """``batch`` with a seeded ``share`` of its items marked unlabelled, keeping at least one
    labelled item per new category so that the stage can learn it."""
    if share <= 0:
        return batch
    rng = np.random.default_rng(seed)
    hidden = rng.random(len(batch)) < share
    columns = [batch.categories.index(c) for c in batch.new_categories]
    for c in columns:
        carriers = np.flatnonzero(batch.labels[:, c])
        if carriers.size and hidden[carriers].all():
            hidden[carriers[0]] = False
    return batch.without_labels(hidden)
