import numpy as np
import pytest

from lifelong_hashing.config import DatasetConfig, StagesConfig
from lifelong_hashing.engine.datasets import load_dataset, synthetic_dataset
from lifelong_hashing.engine.stages import StagePlanError, plan_stages

from .conftest import WIKIPEDIA

pytestmark = pytest.mark.unit


def test_wikipedia_base_then_two_per_stage():
    plan = plan_stages(load_dataset(DatasetConfig(path=str(WIKIPEDIA))), StagesConfig(base=4, per_stage=2))
    assert [s.new_categories for s in plan.stages] == [
        ("art", "biology", "geography", "history"), ("literature", "media"), ("music", "royalty"),
        ("sport", "warfare")]
    assert sum(len(s.batch) for s in plan.stages) == 2173
    assert [len(s.batch.categories) for s in plan.stages] == [4, 6, 8, 10]
    q1, task = plan.queries_at(1)
    assert set(task.tolist()) == {0, 1} and q1.labels.shape[1] == 6
    assert len(plan.queries_at(3)[0]) == 693


def test_multilabel_item_goes_to_its_newest_category():
    ds = synthetic_dataset(600, 6, 8, 8, query_size=100, seed=0)
    plan = plan_stages(ds, StagesConfig(groups=[["synthetic_000", "synthetic_001", "synthetic_002"],
                                                ["synthetic_003", "synthetic_004"], ["synthetic_005"]]))
    for stage in plan.stages:
        newest = stage.batch.labels[:, -len(stage.new_categories):].any(axis=1)
        assert newest.all(), "every item of a stage carries one of that stage's categories"
    full = ds.database.labels
    expected_stage2 = np.flatnonzero(full[:, 5] == 1)
    assert sorted(plan.stages[2].batch.ids.tolist()) == sorted(ds.database.ids[expected_stage2].tolist())


def test_explicit_groups_may_leave_categories_out_and_reorder():
    ds = synthetic_dataset(600, 6, 8, 8, query_size=100, seed=0)
    plan = plan_stages(ds, StagesConfig(groups=[["synthetic_004", "synthetic_001"], ["synthetic_000"]]))
    assert plan.vocabulary == ("synthetic_004", "synthetic_001", "synthetic_000")
    assert all((s.batch.labels.sum(axis=1) > 0).all() for s in plan.stages)


@pytest.mark.parametrize(("cfg", "words"), [
    (StagesConfig(groups=[["synthetic_000"], ["nope"]]), "unknown categories ['nope']"),
    (StagesConfig(groups=[["synthetic_000"], ["synthetic_000"]]), "twice"),
    (StagesConfig(base=6), "leaves no category"),
    (StagesConfig(order=["synthetic_000"]), "permutation"),
])
def test_bad_stage_plans_are_explained(cfg, words):
    with pytest.raises(StagePlanError, match=words.replace("[", r"\[").replace("]", r"\]")):
        plan_stages(synthetic_dataset(300, 6, 8, 8, query_size=50), cfg)


def test_an_unlabelled_share_hides_labels_from_training_but_keeps_them_for_scoring():
    ds = synthetic_dataset(1200, 6, 8, 8, query_size=100, seed=0)
    cfg = StagesConfig(base=2, per_stage=2, unlabelled_share=0.5)
    plan, full = plan_stages(ds, cfg, seed=1), plan_stages(ds, StagesConfig(base=2, per_stage=2))
    for mixed, whole in zip(plan.stages, full.stages, strict=True):
        share = 1 - mixed.batch.labelled.mean()
        assert 0.4 < share < 0.6
        np.testing.assert_array_equal(mixed.batch.labels, whole.batch.labels)  # the truth, kept for scoring
        new = mixed.batch.labels[mixed.batch.labelled][:, -len(mixed.new_categories):]
        assert new.any(axis=0).all(), "every new category keeps a labelled item"
    other = plan_stages(ds, cfg, seed=2)
    assert (other.stages[0].batch.labelled != plan.stages[0].batch.labelled).any()  # the draw follows the seed
