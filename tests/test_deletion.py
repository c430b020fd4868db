"""Erasure on a trained state: a deleted item leaves the code store, the method's memory or kept
batches and the reference samples, for every method; deleting again is a no-op, an unknown id an
error that changes nothing; the state on disk keeps no deleted id."""

import json

import numpy as np
import pytest

from lifelong_hashing.cli import main
from lifelong_hashing.engine.codestore import CodeStoreError
from lifelong_hashing.engine.runner import build_plan, delete_items, learn_stage
from lifelong_hashing.engine.state import load_state, new_state, save_state

pytestmark = pytest.mark.unit


def _trained(params):
    plan = build_plan(params)
    first = plan.stages[0].batch
    state = new_state(params, first.image.shape[1:], first.text.shape[1])
    for stage in plan.stages[:2]:
        learn_stage(state, stage, plan.queries)
    return state, plan


def _strings_on_disk(folder) -> set[str]:
    """Every string a state folder holds: in its npz arrays and its JSON files."""
    found: set[str] = set()
    for path in folder.rglob("*.npz"):
        with np.load(path, allow_pickle=False) as arrays:
            found |= {str(v) for k in arrays.files if arrays[k].dtype.kind == "U" for v in arrays[k].ravel()}
    for path in folder.rglob("*.json"):
        found |= set(json.dumps(json.loads(path.read_text())).split('"'))
    return found


def _kept_ids(state) -> set[str]:
    method = state.method
    kept = set(method.memory.ids.tolist()) if method.memory is not None else set()
    for batch in getattr(method, "seen", []):
        kept |= set(batch.ids.tolist())
    return kept


@pytest.mark.parametrize("method", ["joint", "orthohash", "dlch", "ccmh_gam"])
def test_a_deleted_item_leaves_the_store_the_memory_and_the_reference(params_factory, method, tmp_path):
    state, plan = _trained(params_factory(method, **{"train.epochs": 2, "train.lifelong_epochs": 1}))
    kept = sorted(_kept_ids(state))
    sampled = state.reference.ids.tolist()
    victims = sorted({kept[0], kept[-1], sampled[0], sampled[-1], state.store.ids[5]})
    size = len(state.store)
    counts = delete_items(state, victims, plan.queries)
    assert counts["deleted"] == len(victims) and len(state.store) == size - len(victims)
    assert counts["memory_rows"] >= 1 and counts["reference_rows"] >= 1
    assert not set(victims) & (set(state.store.ids.tolist()) | _kept_ids(state) | set(state.reference.ids.tolist()))
    assert state.history[-1]["items_deleted"] == len(victims)

    save_state(state, tmp_path / "state")
    again = load_state(tmp_path / "state")
    assert not set(victims) & (set(again.store.ids.tolist()) | _kept_ids(again) | set(again.reference.ids.tolist()))
    assert not set(victims) & _strings_on_disk(tmp_path / "state")  # not even in a list of names

    assert delete_items(again, victims[:2], plan.queries) == {"requested": 2, "already_deleted": 2, "deleted": 0}
    before = (again.store.ids.copy(), len(_kept_ids(again)))
    with pytest.raises(CodeStoreError, match="ids not in the store: 'no-such-item'; nothing was deleted"):
        delete_items(again, [str(again.store.ids[0]), "no-such-item"], plan.queries)
    assert np.array_equal(again.store.ids, before[0]) and len(_kept_ids(again)) == before[1]


def test_lhash_delete_then_export(params_factory, tmp_path, capsys):
    params = params_factory("orthohash", **{"train.epochs": 2, "train.lifelong_epochs": 1})
    state, _ = _trained(params)
    save_state(state, tmp_path / "state")
    (tmp_path / "params.yaml").write_text(json.dumps(params.model_dump()))
    ids = state.store.ids[:3].tolist()
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    argv = ["--params", str(tmp_path / "params.yaml")]
    assert main([*argv, "delete", "--state", str(tmp_path / "state"), "--ids-file", str(tmp_path / "ids.txt")]) == 0
    assert "deleted 3 items (0 deleted before)" in capsys.readouterr().out
    assert main([*argv, "delete", "--state", str(tmp_path / "state"), "--ids", ids[0]]) == 0
    assert "deleted 0 items (1 deleted before)" in capsys.readouterr().out
    assert main([*argv, "delete", "--state", str(tmp_path / "state"), "--ids", "nobody"]) == 2
    assert "ids not in the store: 'nobody'" in capsys.readouterr().err
    assert main([*argv, "export", "--state", str(tmp_path / "state"), "--models", str(tmp_path / "models")]) == 0
    from lifelong_hashing.engine.codestore import CodeStore

    served = CodeStore.load(tmp_path / "models" / "versions" / "v0001" / "codes.npz")
    assert len(served) == len(state.store) - 3 and not set(ids) & set(served.ids.tolist())
