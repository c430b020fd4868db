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
