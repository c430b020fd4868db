import numpy as np
import pytest

from lifelong_hashing.engine.codestore import pack_codes
from lifelong_hashing.engine.metrics import (
    average_map,
    backward_transfer,
    forgetting,
    map_per_query_reference,
    mean_average_precision,
    per_query_ap,
    pr_curve,
    precision_at_k,
)

pytestmark = pytest.mark.unit


def _random_problem(seed, n_query=40, n_db=500, bits=8, classes=5):
    rng = np.random.default_rng(seed)
    q = pack_codes(rng.choice([-1, 1], size=(n_query, bits)))  # 8 bits: distances tie a lot
    db = pack_codes(rng.choice([-1, 1], size=(n_db, bits)))
    lq = (rng.random((n_query, classes)) < 0.3).astype(np.uint8)
    ldb = (rng.random((n_db, classes)) < 0.3).astype(np.uint8)
    return q, db, lq, ldb


@pytest.mark.parametrize("seed", range(4))
def test_fast_map_equals_per_query_reference_with_ties(seed):
    q, db, lq, ldb = _random_problem(seed)
    assert mean_average_precision(q, db, lq, ldb) == pytest.approx(map_per_query_reference(q, db, lq, ldb), abs=1e-12)


def test_map_is_one_for_perfect_codes_and_tie_rule_is_database_position():
    codes = pack_codes(np.array([[1, 1, 1, 1], [-1, -1, -1, -1]]))
    db = codes[[0, 1, 0, 1]]
    ldb = np.array([[1, 0], [0, 1], [1, 0], [0, 1]])
    assert mean_average_precision(codes, db, np.eye(2), ldb) == 1.0
    # Every database code at the same distance: order is position, so AP = mean(1/1, 2/3).
    flat = pack_codes(np.ones((3, 4)))
    ap = mean_average_precision(flat[:1], flat, np.array([[1, 0]]), np.array([[1, 0], [0, 1], [1, 0]]))
    assert ap == pytest.approx((1 + 2 / 3) / 2)


def test_map_at_r_and_precision_at_k_by_hand():
    q = pack_codes(np.array([[1, 1, 1, 1]]))
    db = pack_codes(np.array([[1, 1, 1, 1], [1, 1, 1, -1], [1, 1, -1, -1], [-1, -1, -1, -1]]))
    lq, ldb = np.array([[1, 0]]), np.array([[0, 1], [1, 0], [0, 1], [1, 0]])
    # ranking: 0 (irrelevant), 1 (relevant), 2 (irrelevant), 3 (relevant)
    assert mean_average_precision(q, db, lq, ldb, top_r=2) == pytest.approx(0.5)
    assert mean_average_precision(q, db, lq, ldb) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert precision_at_k(q, db, lq, ldb, 2) == pytest.approx(0.5)
    assert precision_at_k(q, db, lq, ldb, 4) == pytest.approx(0.5)


def test_queries_without_relevant_items_are_left_out():
    q, db, lq, ldb = _random_problem(0)
    lq[0] = 0
    lq[0, 0] = 1
    ldb[:, 0] = 0  # nobody shares label 0 with query 0 ...
    lq[0, 1:] = 0  # ... and query 0 has no other label
    with_q0 = mean_average_precision(q, db, lq, ldb)
    without = mean_average_precision(q[1:], db, lq[1:], ldb)
    assert with_q0 == pytest.approx(without)


def test_pr_curve_is_cumulative_over_radius():
    q, db, lq, ldb = _random_problem(2, bits=16)
    curve = pr_curve(q, db, lq, ldb, 16)
    recall = np.array(curve["recall"])
    assert len(recall) == 17 and (np.diff(recall) >= -1e-12).all() and recall[-1] == pytest.approx(1.0)
    relevant_share = (lq.astype(float) @ ldb.T > 0).mean(axis=1)
    assert curve["precision"][-1] == pytest.approx(relevant_share[relevant_share > 0].mean(), abs=1e-6)


def test_forgetting_backward_transfer_and_average():
    nan = np.nan
    m = np.array([[0.8, nan, nan], [0.6, 0.9, nan], [0.5, 0.7, 0.95]])
    np.testing.assert_allclose(forgetting(m), [0.3, 0.2])
    assert backward_transfer(m) == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)
    np.testing.assert_allclose(average_map(m), [0.8, 0.75, (0.5 + 0.7 + 0.95) / 3])


def test_conventions_for_queries_without_relevant_items():
    """mAP skips a query with no relevant item (and evaluate_stage counts it); P@k scores it 0."""
    from lifelong_hashing.config import Params
    from lifelong_hashing.engine.batch import make_batch
    from lifelong_hashing.engine.codestore import CodeStore
    from lifelong_hashing.engine.runner import evaluate_stage

    codes = pack_codes(np.array([[1, 1, 1, 1, 1, 1, 1, 1], [-1, -1, -1, -1, -1, -1, -1, -1]]))
    db_labels = np.array([[1, 0, 0], [1, 0, 0]], np.uint8)
    q_labels = np.array([[1, 0, 0], [0, 1, 0]], np.uint8)  # the second has nothing relevant
    assert np.isnan(per_query_ap(codes, codes, q_labels, db_labels)[1])
    assert mean_average_precision(codes, codes, q_labels, db_labels) == 1.0
    assert precision_at_k(codes, codes, q_labels, db_labels, 1) == 0.5

    class Fixed:  # a method whose encoders return these codes
        def encode(self, modality, features):
            return codes

    store = CodeStore(8)
    store.append(["d0", "d1"], 0, db_labels, ("a", "b", "c"), {"image": codes, "text": codes})
    queries = make_batch(["q0", "q1"], np.zeros((2, 3)), np.zeros((2, 3)), q_labels, ["a", "b", "c"])
    params = Params.model_validate({"eval": {"map_at": [1], "precision_at": [1]}})
    scores = evaluate_stage(Fixed(), store, queries, [("a", "b", "c")], params)["i2t"]
    assert scores["queries"] == 2 and scores["skipped"] == {"map_all": 1, "map_at_1": 1}
    assert scores["map_all"] == 1.0 and scores["precision_at_1"] == 0.5
