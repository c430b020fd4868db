"""The benchmark tables in docs/benchmarks.md and README.md are generated from bench/results:
they must match the measurements that are committed."""

import subprocess
import sys

import pytest

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import report  # noqa: E402

pytestmark = pytest.mark.unit


def test_generated_tables_match_the_committed_results():
    proc = subprocess.run([sys.executable, "bench/report.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_stale_block_is_rewritten_and_an_unknown_one_is_an_error(tmp_path):
    doc = "prose\n<!-- generated: eval-speed -->\n| old | table |\n<!-- end generated -->\nmore prose\n"
    fresh = report.render(tmp_path / "x.md", doc)
    assert fresh.startswith("prose\n<!-- generated: eval-speed -->\n| implementation |")
    assert fresh.endswith("<!-- end generated -->\nmore prose\n") and "| old | table |" not in fresh
    assert report.render(tmp_path / "x.md", fresh) == fresh
    with pytest.raises(SystemExit, match="unknown generated block 'nope'"):
        report.render(tmp_path / "x.md", "<!-- generated: nope -->\n<!-- end generated -->\n")


def test_the_finetune_verdict_pairs_seeds_and_never_ranks_inside_the_spread():
    scores = {"a": (0.50, 0.60, 0.70), "b": (0.48, 0.58, 0.68), "c": (0.52, 0.55, 0.73)}
    rows = [{"method": m, "seed": s, "i2t": v} for m, vals in scores.items() for s, v in enumerate(vals)]
    assert report.versus(rows, "a", "b", "i2t") == "+0.020 ± 0.000 (better)"  # same gap on every seed
    assert report.versus(rows, "c", "b", "i2t").endswith("(noise)")  # +0.020 on average, ± 0.044


def test_tuning_never_saw_a_test_query_and_used_no_benchmark_seed():
    """bench/results/tuning.json: every row was scored on the validation split of its seed (the
    fingerprint of its query ids is that split's), which shares no item with the test queries;
    no tuning seed is a benchmark seed."""
    import json

    import quality

    from lifelong_hashing.engine.datasets import load_dataset

    tuning = json.loads((ROOT / "bench" / "results" / "tuning.json").read_text())
    benchmark_seeds = {r["seed"] for r in json.loads((ROOT / "bench" / "results" / "quality.json").read_text())}
    assert {r["queries"] for r in tuning["rows"]} == {"validation"}
    assert not {r["seed"] for r in tuning["rows"]} & benchmark_seeds
    for dataset, seed in sorted({(r["dataset"], r["seed"]) for r in tuning["rows"]}):
        params = quality.case_params(quality.CASES[dataset], "a", 64, "orthohash", seed, 1, queries="validation")
        params = params.model_copy(update={"dataset": params.dataset.model_copy(
            update={"path": str(ROOT / params.dataset.path)})})
        assert {r["query_ids_sha256"] for r in tuning["rows"] if (r["dataset"], r["seed"]) == (dataset, seed)} == {
            quality.query_ids_sha256(params)}
        validation = set(load_dataset(params.dataset, seed).queries.ids.tolist())
        test = set(load_dataset(params.dataset.model_copy(update={"queries": "test"}), seed).queries.ids.tolist())
        assert validation and not validation & test
