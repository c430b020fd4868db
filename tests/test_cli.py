import json

import pytest
import yaml

from lifelong_hashing.cli import main

from .conftest import small_params

pytestmark = pytest.mark.integration


def _params_file(tmp_path, method="orthohash", **overrides):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(small_params(method, **overrides).model_dump()))
    return path


def test_run_writes_metrics_table_and_state(tmp_path, capsys):
    params = _params_file(tmp_path)
    assert main(["--params", str(params), "run", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "| stage | new categories" in printed and "final average mAP" in printed
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["method"] == "orthohash" and len(metrics["stages"]) == 3
    for d in ("i2t", "t2i"):
        matrix = metrics[d]["matrix"]
        assert len(matrix) == 3 and matrix[0][1] is None and all(v is not None for v in matrix[2])
        assert len(metrics["pr_curve"][d]["precision"]) == 33
        assert "map_at_50" in metrics["stages"][0][d] and "precision_at_10" in metrics["stages"][0][d]
    assert metrics["total_codes_rewritten"] == 0
    assert (tmp_path / "out" / "table.md").read_text().startswith("| stage")
    assert (tmp_path / "out" / "state" / "codes.npz").exists()


def test_compare_prints_one_row_per_method(tmp_path, capsys):
    params = _params_file(tmp_path)
    out = tmp_path / "cmp"
    assert main(["--params", str(params), "-S", "train.epochs=4", "compare", "--methods", "joint", "dlch",
                 "--out", str(out)]) == 0
    table = (out / "compare.md").read_text()
    assert "| joint" in table and "| dlch" in table and "codes rewritten" in table
    result = json.loads((out / "compare.json").read_text())
    assert result["joint"]["total_codes_rewritten"] > 0 and result["dlch"]["total_codes_rewritten"] == 0
    assert "| dlch" in capsys.readouterr().out


def test_bad_params_and_inputs_fail_with_one_clear_line(tmp_path, capsys):
    params = _params_file(tmp_path)
    cases = [
        (["--params", str(tmp_path / "missing.yaml"), "run"], "params file not found"),
        (["--params", str(params), "-S", "model.bitz=32", "run"], "model.bitz"),
        (["--params", str(params), "-S", "model.bits=30", "run"], "multiple of 8"),
        (["--params", str(params), "-S", "nonsense", "run"], "must look like section.key=value"),
        (["--params", str(params), "-S", "dataset.kind=npz", "-S", f"dataset.path={tmp_path}/x.npz", "run"],
         "x.npz: field 'file': does not exist"),
        (["--params", str(params), "-S", "stages.base=8", "run"], "leaves no category"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("lhash: error:") and words in err, (argv, err)


def test_importing_the_registry_leaves_the_process_log_handlers_open():
    """GTO configures logging when imported, which would flush and close every handler the
    process has (a Prefect flow run's among them); the registry imports it without that."""
    import subprocess
    import sys

    code = ("import logging, sys\n"
            "class Kept(logging.Handler):\n"
            "    closed = False\n"
            "    def emit(self, record): pass\n"
            "    def close(self): Kept.closed = True\n"
            "handler = Kept(); logging.getLogger().addHandler(handler)\n"
            "import lifelong_hashing.operations.registry\n"
            "import gto.api\n"
            "print('gto' in sys.modules, handler in logging.getLogger().handlers, Kept.closed)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "False"]
