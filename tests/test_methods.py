"""Methods on real (small, synthetic) computation: frozen codes, learning, state, determinism."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from lifelong_hashing.batch import make_batch
from lifelong_hashing.codestore import CodeStore
from lifelong_hashing.encoders import pick_device
from lifelong_hashing.methods import MethodError, create_method
from lifelong_hashing.runner import build_plan, run_sequence, run_stage
from lifelong_hashing.stages import Stage
from lifelong_hashing.state import StateError, load_state, new_state, save_state

from .conftest import ROOT, small_params

LIFELONG = ["finetune", "dlch", "ccmh_gam", "orthohash"]


def _stages(method):
    params = small_params(method)
    plan = build_plan(params)
    first = plan.stages[0].batch
    return params, plan, new_state(params, first.image.shape[1:], first.text.shape[1])


@pytest.mark.parametrize("method", LIFELONG)
def test_lifelong_methods_never_change_stored_codes(method):
    _, plan, state = _stages(method)
    snapshots = []
    for _ in plan.stages:
        record = run_stage(state, plan)
        assert record["codes_rewritten"] == 0
        for earlier in snapshots:
            for m in ("image", "text"):
                np.testing.assert_array_equal(state.store.codes[m][: len(earlier[m])], earlier[m])
        snapshots.append({m: c.copy() for m, c in state.store.codes.items()})
    assert len(state.store) == sum(len(s.batch) for s in plan.stages)


def test_joint_retrains_and_rewrites_old_codes():
    _, plan, state = _stages("joint")
    run_stage(state, plan)
    record = run_stage(state, plan)
    assert record["codes_rewritten"] > 0.5 * len(plan.stages[0].batch)


@pytest.mark.parametrize("method", ["joint", "dlch", "ccmh_gam", "orthohash"])
def test_base_stage_learns_far_above_chance(method):
    _, plan, state = _stages(method)
    record = run_stage(state, plan)
    queries, _ = plan.queries_at(0)
    rel = (queries.labels.astype(float) @ state.store.labels.T > 0).mean()
    for direction in ("i2t", "t2i"):
        assert record[direction]["map_all"] > rel + 0.25, (direction, record[direction]["map_all"], rel)


def test_state_resumes_in_a_fresh_process_with_identical_codes(tmp_path):
    params = small_params("dlch")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump()))
    state_dir = tmp_path / "run" / "state"
    for _ in range(3):  # each stage in its own process
        done = subprocess.run([sys.executable, "-m", "lifelong_hashing.cli", "--params", str(params_file),
                               "stage", "--state", str(state_dir)], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "metrics.json").exists()
    in_process = run_sequence(params, tmp_path / "one", quiet=True)
    a, b = CodeStore.load(state_dir / "codes.npz"), CodeStore.load(tmp_path / "one" / "state" / "codes.npz")
    for m in ("image", "text"):
        np.testing.assert_array_equal(a.codes[m], b.codes[m])
    resumed = load_state(state_dir)
    assert resumed.stage == 2 and resumed.method.categories == b.categories
    assert in_process["stages"][-1]["t2i"]["map_all"] == pytest.approx(resumed.history[-1]["t2i"]["map_all"])


def test_failed_save_keeps_the_last_good_state(tmp_path, monkeypatch):
    params, plan, state = _stages("orthohash")
    run_stage(state, plan)
    target = save_state(state, tmp_path / "state")
    before = (target / "codes.npz").read_bytes()
    run_stage(state, plan)

    def broken(path):
        raise OSError("disk full")

    monkeypatch.setattr(state.store, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_state(state, target)
    assert (target / "codes.npz").read_bytes() == before
    assert load_state(target).stage == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_load_state_errors_are_clear(tmp_path):
    with pytest.raises(StateError, match="not a state directory"):
        load_state(tmp_path)


def test_inputs_that_do_not_fit_the_model_are_refused():
    params, plan, state = _stages("finetune")
    run_stage(state, plan)
    stage = plan.stages[1]
    bad = stage.batch.__class__(stage.batch.ids, stage.batch.image[:, :5], stage.batch.text, stage.batch.labels,
                                stage.batch.categories, source="incoming/bad.npz")
    with pytest.raises(MethodError, match=r"incoming/bad.npz: image shape \(5,\) != model's \(24,\)"):
        state.method.learn(stage.__class__(1, stage.new_categories, stage.categories, bad), state.store)
    with pytest.raises(MethodError, match="expected stage 1, got stage 2"):
        state.method.learn(plan.stages[2], state.store)
    with pytest.raises(MethodError, match="unknown method 'magic'"):
        create_method("magic", params, (24,), 40)


def test_cnn_encoder_trains_a_stage_on_pixels():
    params = small_params("finetune", **{"model.image_encoder": "cnn", "train.epochs": 2})
    rng = np.random.default_rng(0)
    labels = np.eye(2, dtype=np.uint8)[rng.integers(2, size=40)]
    pixels = rng.random((40, 3, 8, 8)) + labels[:, :1, None, None]  # class 0 is brighter
    batch = make_batch([f"p{i}" for i in range(40)], pixels, rng.random((40, 10)), labels, ["dark", "bright"])
    method = create_method("finetune", params, (3, 8, 8), 10)
    store = CodeStore(32)
    result = method.learn(Stage(0, ("dark", "bright"), ("dark", "bright"), batch), store)
    assert len(store) == 40 and np.isfinite(result.final_loss) and method.image_net.mean.shape == (3, 1, 1)


def test_cuda_request_without_gpu_is_explained():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        pick_device("cuda")
    assert pick_device("auto").type == "cpu"
