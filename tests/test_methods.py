"""Methods on real (small, synthetic) computation: frozen codes, learning, state, determinism."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lifelong_hashing.engine.batch import make_batch
from lifelong_hashing.engine.codestore import CodeStore, pack_codes, unpack_codes
from lifelong_hashing.engine.encoders import pick_device
from lifelong_hashing.engine.methods import MethodError, create_method
from lifelong_hashing.engine.runner import build_plan, run_sequence, run_stage
from lifelong_hashing.engine.stages import Stage
from lifelong_hashing.engine.state import StateError, load_state, new_state, save_state

from .conftest import ROOT, small_params

pytestmark = pytest.mark.integration

LIFELONG = ["finetune", "dlch", "ccmh_gam", "orthohash"]


def _stages(method, **overrides):
    params = small_params(method, **overrides)
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
    _, plan, state = _stages("joint", **{"method.database_codes": "encoders"})
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


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("method", ["joint", "finetune", "dlch", "ccmh_gam", "orthohash"])
def test_stages_resumed_in_fresh_processes_equal_a_continuous_run_bit_for_bit(tmp_path, method):
    params = small_params(method)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump()))
    state_dir = tmp_path / "run" / "state"
    for t in range(3):  # each stage in its own process
        done = subprocess.run([sys.executable, "-m", "lifelong_hashing.cli", "--params", str(params_file),
                               "stage", "--state", str(state_dir)], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        assert f"{method} stage {t}: " in done.stderr  # progress reaches a log even without a terminal
    in_process = run_sequence(params, tmp_path / "one", quiet=True)
    resumed, continuous = _files(state_dir), _files(tmp_path / "one" / "state")
    assert sorted(resumed) == sorted(continuous)
    assert [name for name in resumed if resumed[name] != continuous[name]] == []  # weights, codes, state.json
    assert (tmp_path / "run" / "metrics.json").read_bytes() == (tmp_path / "one" / "metrics.json").read_bytes()
    state = load_state(state_dir)
    assert state.stage == 2 and [t["stage"] for t in state.timings] == [0, 1, 2]
    assert all(t["train_seconds"] > 0 for t in in_process["timings"])
    assert "train_seconds" not in (state_dir / "state.json").read_text()  # timings stay out of the state


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state", "timings.json"]


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


def test_dcc_codes_follow_the_labels_not_just_the_outputs():
    """With the tie weighted α·m (not α·m·K) the similarity term decides most bits: items with
    the same labels get nearly the same code, whatever their weak continuous outputs."""
    from lifelong_hashing.engine.losses import graded_similarity
    from lifelong_hashing.engine.methods.dlch import dcc_codes

    rng = np.random.default_rng(0)
    bits, n_classes = 32, 4
    class_codes = torch.as_tensor(rng.choice([-1.0, 1.0], size=(n_classes, bits)), dtype=torch.float32)
    anchor_class = rng.integers(n_classes, size=400)
    anchors = class_codes[anchor_class]
    anchor_labels = torch.as_tensor(np.eye(n_classes)[anchor_class], dtype=torch.float32)
    item_class = rng.integers(n_classes, size=200)
    labels = torch.as_tensor(np.eye(n_classes)[item_class], dtype=torch.float32)
    outputs = torch.as_tensor(np.tanh(0.3 * rng.normal(size=(200, bits))), dtype=torch.float32)

    def solve(item_labels):
        term = bits * graded_similarity(item_labels, anchor_labels) @ anchors
        return dcc_codes(term, anchors.T @ anchors, len(anchors), outputs, alpha=10.0, iters=3)

    codes = solve(labels)
    assert (codes != torch.sign(outputs)).float().mean() > 0.2  # not sign(U) (α·m·K: 3 % of bits)
    agreement = (codes == class_codes[item_class]).float().mean()
    assert agreement > 0.75, agreement  # toward their own class codes (α·m·K: 53 %, chance)
    shuffled = solve(labels[torch.as_tensor(rng.permutation(200))])
    assert (shuffled != codes).float().mean() > 0.2  # other labels, other codes (α·m·K: a few %)


def test_dlch_stores_the_codes_it_solved():
    _, plan, state = _stages("dlch")
    run_stage(state, plan)
    run_stage(state, plan)
    batch = plan.stages[1].batch
    rows = state.store.rows_of(batch.ids)
    solved = state.store.codes["image"][rows]
    np.testing.assert_array_equal(solved, pack_codes(state.method.solved_codes))
    assert (solved != state.method.encoder_codes(batch)["image"]).any()  # not the encoders' signs
    np.testing.assert_array_equal(state.store.codes["text"][rows], solved)  # one code per item


@pytest.mark.parametrize("method", ["joint", "finetune", "dlch", "ccmh_gam", "orthohash"])
def test_the_encoders_rule_stores_each_modalitys_encoder_code(method):
    _, plan, state = _stages(method, **{"method.database_codes": "encoders"})
    for t in range(2):
        run_stage(state, plan)
        rows = state.store.rows_of(plan.stages[t].batch.ids)
        for modality, codes in state.method.encoder_codes(plan.stages[t].batch).items():
            np.testing.assert_array_equal(state.store.codes[modality][rows], codes)
    assert (state.store.codes["image"] != state.store.codes["text"]).any()


def _label_code_rows(method, batch):
    """What the labels rule stores for a stage's labelled items, as each method defines it."""
    if method.name == "dlch":
        return pack_codes(method.solved_codes)
    return method.label_codes(batch.labelled_part())


@pytest.mark.parametrize("method", ["joint", "finetune", "dlch", "ccmh_gam", "orthohash"])
def test_the_labels_rule_gives_unlabelled_items_their_encoder_codes(method):
    _, plan, state = _stages(method, **{"stages.unlabelled_share": 0.5})
    run_stage(state, plan)
    run_stage(state, plan)
    batch = plan.stages[1].batch
    assert 0 < batch.labelled.sum() < len(batch)
    rows = state.store.rows_of(batch.ids)
    np.testing.assert_array_equal(state.store.labelled[rows], batch.labelled)
    encoders = state.method.encoder_codes(batch)
    for modality in ("image", "text"):
        stored = state.store.codes[modality][rows]
        np.testing.assert_array_equal(stored[~batch.labelled], encoders[modality][~batch.labelled])
        np.testing.assert_array_equal(stored[batch.labelled], _label_code_rows(state.method, batch))


def _relabel_hidden(stage: Stage, rng) -> Stage:
    """The stage with other (wrong) labels on its unlabelled items: what training must never see."""
    b = stage.batch
    labels = b.labels.copy()
    hidden = np.flatnonzero(~b.labelled)
    labels[hidden] = labels[rng.choice(np.flatnonzero(b.labelled), size=hidden.size)]
    labels[hidden, rng.integers(len(b.categories), size=hidden.size)] = 1
    wrong = make_batch(b.ids, b.image, b.text, labels, b.categories, new_categories=b.new_categories,
                       labelled=b.labelled)
    return Stage(stage.index, stage.new_categories, stage.categories, wrong)


@pytest.mark.parametrize("method", ["joint", "finetune", "dlch", "ccmh_gam", "orthohash"])
def test_training_never_reads_the_labels_of_unlabelled_items(method):
    params, plan, truth = _stages(method, **{"stages.unlabelled_share": 0.4})
    first = plan.stages[0].batch
    wrong = new_state(params, first.image.shape[1:], first.text.shape[1])
    rng = np.random.default_rng(0)
    for stage in plan.stages:
        truth.method.learn(stage, truth.store)
        altered = _relabel_hidden(stage, rng)
        assert (altered.batch.labels != stage.batch.labels).any()
        wrong.method.learn(altered, wrong.store)
    for modality in ("image", "text"):
        np.testing.assert_array_equal(truth.store.codes[modality], wrong.store.codes[modality])


def test_joint_retrains_on_appended_items_and_rewrites_their_rows_by_id():
    from lifelong_hashing.engine.runner import append_known

    _, plan, state = _stages("joint")
    run_stage(state, plan)
    extra = plan.stages[0].batch.subset(np.arange(40))
    extra = make_batch([f"late-{i}" for i in range(40)], extra.image, extra.text, extra.labels, extra.categories)
    append_known(state, extra, plan.queries)
    appended = state.store.rows_of(extra.ids)
    np.testing.assert_array_equal(appended, np.arange(len(plan.stages[0].batch), len(plan.stages[0].batch) + 40))
    run_stage(state, plan)
    assert len(state.method.seen) == 3  # stage 0, the appended batch, stage 1
    method = state.method
    for batch in (plan.stages[0].batch, extra, plan.stages[1].batch):
        rows = state.store.rows_of(batch.ids)
        aligned = batch.with_categories(method.categories)
        for modality, codes in method.database_codes(aligned).items():
            np.testing.assert_array_equal(state.store.codes[modality][rows], codes)


def test_orthohash_stores_the_codes_the_labels_vote_for():
    _, plan, state = _stages("orthohash")
    run_stage(state, plan)
    run_stage(state, plan)
    method, batch = state.method, plan.stages[1].batch
    codes = unpack_codes(state.store.codes["text"][state.store.rows_of(batch.ids)], method.bits)
    votes = batch.labels.astype(int) @ method.codebook.astype(int)
    decided = votes != 0
    np.testing.assert_array_equal(codes[decided], np.sign(votes[decided]))
    single = batch.labels.sum(axis=1) == 1
    assert single.any()
    np.testing.assert_array_equal(codes[single], method.codebook[batch.labels[single].argmax(axis=1)])
    np.testing.assert_array_equal(state.store.codes["image"], state.store.codes["text"])


@pytest.mark.parametrize("method", ["joint", "orthohash"])
def test_one_training_scored_under_both_rules_equals_a_run_per_rule(method):
    """The quality benchmark trains a method once and scores it under both storing rules: each
    rule's record must be exactly what a run under that rule alone gives."""
    sys.path.insert(0, str(ROOT / "bench"))
    import quality

    params = small_params(method, **{"stages.unlabelled_share": 0.3})
    both = quality.run_rules(params, ("labels", "encoders"))
    for rule in ("labels", "encoders"):
        alone = quality.run_rules(params, (rule,))[rule]
        for direction in ("i2t", "t2i"):
            assert both[rule][direction]["matrix"] == alone[direction]["matrix"]
        assert both[rule]["total_codes_rewritten"] == alone["total_codes_rewritten"]
    assert both["labels"]["i2t"]["matrix"] != both["encoders"]["i2t"]["matrix"]
