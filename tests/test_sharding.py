"""Shards on disk for other processes: encoded shards and scored query shards, joined in order,
equal the work done at once (bit for bit; float scores exactly)."""

import numpy as np
import pytest

from lifelong_hashing.config import EvalConfig
from lifelong_hashing.engine import sharding
from lifelong_hashing.engine.batch import Batch
from lifelong_hashing.engine.codestore import pack_codes
from lifelong_hashing.engine.methods.base import ENCODE_BLOCK
from lifelong_hashing.engine.metrics import query_scores
from lifelong_hashing.engine.runner import evaluate_stage

pytestmark = pytest.mark.unit


def test_shard_bounds_are_whole_encoder_blocks_and_cover_every_row():
    bounds = sharding.shard_bounds(3 * ENCODE_BLOCK + 5, ENCODE_BLOCK + 1)
    assert bounds == [(0, 2 * ENCODE_BLOCK), (2 * ENCODE_BLOCK, 3 * ENCODE_BLOCK + 5)]
    assert sharding.shard_bounds(10, 1) == [(0, 10)]


def test_query_shards_scored_apart_equal_scoring_every_query_at_once(tmp_path):
    rng = np.random.default_rng(0)
    db_codes, q_codes = pack_codes(rng.normal(size=(700, 32))), pack_codes(rng.normal(size=(230, 32)))
    db_labels = (rng.random((700, 5)) < 0.3).astype(np.uint8)
    q_labels = (rng.random((230, 5)) < 0.3).astype(np.uint8)
    cfg = EvalConfig(map_at=[50], precision_at=[10])
    database, shards = sharding.write_query_shards(q_codes, q_labels, db_codes, db_labels, tmp_path, 64)
    assert len(shards) == 4
    joined = sharding.read_shard_scores([sharding.score_shard(database, s, cfg) for s in shards])
    whole = query_scores(q_codes, db_codes, q_labels, db_labels, cfg)
    assert set(joined) == set(whole) == {"map_all", "map_at_50", "precision_at_10"}
    for key in whole:
        np.testing.assert_array_equal(joined[key], whole[key])
    assert np.isnan(whole["map_all"]).any()  # queries without a relevant item stay NaN, not 0


def test_an_evaluation_on_a_sharding_scorer_gives_the_same_record(tmp_path, params_factory):
    from lifelong_hashing.engine.runner import build_plan, run_stage
    from lifelong_hashing.engine.state import new_state

    params = params_factory("orthohash")
    plan = build_plan(params)
    state = new_state(params, plan.stages[0].batch.image.shape[1:], plan.stages[0].batch.text.shape[1])
    run_stage(state, plan)
    groups = [tuple(plan.stages[0].new_categories)]
    calls = []

    def sharded(q_codes, db_codes, q_labels, db_labels, cfg):
        calls.append(len(q_codes))
        database, shards = sharding.write_query_shards(q_codes, q_labels, db_codes, db_labels,
                                                       tmp_path / str(len(calls)), 7)
        return sharding.read_shard_scores([sharding.score_shard(database, s, cfg) for s in shards])

    expected = evaluate_stage(state.method, state.store, plan.queries, groups, params)
    assert evaluate_stage(state.method, state.store, plan.queries, groups, params, sharded) == expected
    assert len(calls) == 2 and calls[0] > 7  # both directions, several shards each


def test_no_queries_score_to_empty_arrays_as_in_one_process(tmp_path):
    db = pack_codes(np.random.default_rng(1).normal(size=(50, 16)))
    labels = np.ones((50, 2), np.uint8)
    cfg = EvalConfig(map_at=[5], precision_at=[3])
    database, shards = sharding.write_query_shards(db[:0], labels[:0], db, labels, tmp_path, 10)
    joined = sharding.read_shard_scores([sharding.score_shard(database, s, cfg) for s in shards])
    whole = query_scores(db[:0], db, labels[:0], labels, cfg)
    assert set(joined) == set(whole) and all(joined[k].shape == whole[k].shape == (0,) for k in whole)


def sharding_encoder(tmp_path, calls: list):
    """The Dask encoder's work in this process: the method saved for workers, the batch as
    shard files, each shard encoded from the saved copy."""
    from lifelong_hashing.engine.state import save_method

    def encode(method, batch):
        calls.append(len(batch))
        out = tmp_path / f"call-{len(calls)}"
        saved = save_method(method, out / "method")
        assert not (saved / "model" / "seen").exists()  # a worker never gets the joint's past data
        return sharding.read_shard_codes([sharding.encode_shard(saved, s)
                                          for s in sharding.write_shards(batch, out / "shards", 1)])

    return encode


@pytest.mark.parametrize("method", ["joint", "orthohash"])
def test_database_codes_encoded_from_shards_equal_the_in_process_codes(tmp_path, params_factory, method):
    """Through every stage and an append: the joint baseline's re-encoding of past items and the
    append go through the encoder; a lifelong method never calls it while learning."""
    from lifelong_hashing.engine.runner import append_known, build_plan, learn_stage
    from lifelong_hashing.engine.state import new_state

    params = params_factory(method)
    plan = build_plan(params)
    shape, text_dim = plan.stages[0].batch.image.shape[1:], plan.stages[0].batch.text.shape[1]
    here, sharded, calls = new_state(params, shape, text_dim), new_state(params, shape, text_dim), []
    first = plan.stages[0].batch.subset(np.arange(40))
    extra = Batch(np.char.add("again-", first.ids), first.image, first.text, first.labels, first.categories)
    for stage in plan.stages:
        learn_stage(here, stage, plan.queries)
        learn_stage(sharded, stage, plan.queries, encoder=sharding_encoder(tmp_path / str(stage.index), calls))
        if stage.index == 0:
            append_known(here, extra, plan.queries)
            append_known(sharded, extra, plan.queries, encoder=sharding_encoder(tmp_path / "append", calls))
    np.testing.assert_array_equal(sharded.store.ids, here.store.ids)
    for modality in ("image", "text"):
        np.testing.assert_array_equal(sharded.store.codes[modality], here.store.codes[modality])
    assert sharded.history == here.history
    stage_sizes = [len(s.batch) for s in plan.stages]
    if method == "joint":  # the append, then everything stored before stages 1 and 2
        assert calls == [40, stage_sizes[0] + 40, sum(stage_sizes[:2]) + 40]
        assert all(r["codes_rewritten"] > 0 for r in here.history[1:])
    else:
        assert calls == [40] and [r["codes_rewritten"] for r in here.history] == [0, 0, 0]
