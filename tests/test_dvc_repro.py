"""``dvc repro`` of this project (dvc.yaml) in clean clones: the same params give bit-identical
codes on CPU; ``dvc plots`` draws mAP per task; ``dvc exp run -S`` sweeps a param."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lifelong_hashing.engine.codestore import CodeStore

from .conftest import ROOT

pytestmark = pytest.mark.e2e

SMALL = {("train", "epochs"): 1, ("train", "lifelong_epochs"): 1, ("train", "device"): "cpu",
         ("model", "hidden"): [128], ("export", "int8_min_agreement"): None}


ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "DVC_NO_ANALYTICS": "1"}


def sh(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def sh_at_once(args: list[str], cwds: list[Path]) -> None:
    """The same command in several folders at the same time (each is mostly one thread of
    Python and DVC, so two share this machine's cores well)."""
    procs = [subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for cwd in cwds]
    for proc, cwd in zip(procs, cwds, strict=True):
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{' '.join(args)} in {cwd}: {out[-1500:]}\n{err[-3000:]}"


def clean_clone(dest: Path, small: bool = True) -> Path:
    """This checkout's files (tracked, or new and not ignored) in a fresh git repository, with
    small training params committed (unless not ``small``): what a newcomer's clone looks like."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    if small:
        params = yaml.safe_load((dest / "params.yaml").read_text())
        for (section, key), value in SMALL.items():
            params[section][key] = value
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q", "-b", "main"], dest)
    sh(["git", "config", "user.name", "newcomer"], dest)  # dvc exp commits too
    sh(["git", "config", "user.email", "newcomer@example.invalid"], dest)
    sh(["git", "add", "-A"], dest)
    sh(["git", "commit", "-q", "-m", "clone"], dest)
    return dest


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    clones = [clean_clone(tmp_path_factory.mktemp(f"clone{i}")) for i in range(2)]
    sh_at_once([sys.executable, "-m", "dvc", "repro"], clones)  # the same codes, run side by side or not
    return clones


def test_repro_from_clean_clones_gives_bit_identical_codes(reproduced):
    a, b = reproduced
    for path in ("runs/wikipedia/state/codes.npz", "runs/wikipedia/models/versions/v0001/codes.npz"):
        first, second = CodeStore.load(a / path), CodeStore.load(b / path)
        assert len(first) == 2173
        for modality in ("image", "text"):
            np.testing.assert_array_equal(first.codes[modality], second.codes[modality])
    status = json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], a))
    assert status == {}
    assert (a / "dvc.lock").read_bytes() == (b / "dvc.lock").read_bytes()  # every output hash, ONNX too
    metrics = json.loads(sh([sys.executable, "-m", "dvc", "metrics", "show", "--json"], a))
    (values,) = [v["data"]["runs/wikipedia/metrics.json"]["data"] for v in metrics.values()]
    assert 0 < values["t2i"]["final_average_map"] <= 1 and values["i2t"]["mean_forgetting"] >= 0


def test_plots_show_map_per_task_across_stages(reproduced):
    a, _ = reproduced
    sh([sys.executable, "-m", "dvc", "plots", "show", "-o", "plots-out"], a)
    page = (a / "plots-out" / "index.html").read_text()
    assert page.count('"title": "mAP per task, ') == 2  # one plot per direction, nothing else
    assert '"task": "task 3"' in page and '"color": {"field": "task"' in page
    rows = (a / "runs/wikipedia/plots/map_i2t.csv").read_text().splitlines()
    assert rows[0] == "stage,task,map" and len(rows) == 1 + 1 + 2 + 3 + 4


def test_exp_run_sweeps_bits_and_method(reproduced):
    a, _ = reproduced
    sh([sys.executable, "-m", "dvc", "exp", "run", "-S", "model.bits=32", "-S", "method.name=dlch"], a)
    shown = json.loads(sh([sys.executable, "-m", "dvc", "exp", "show", "--json"], a))
    params = [e["data"]["params"]["params.yaml"]["data"]
              for baseline in shown for e in (baseline.get("experiments") or [{}])[0].get("revs", [])
              if e.get("data")]
    assert any(p["model"]["bits"] == 32 and p["method"]["name"] == "dlch" for p in params), shown


def test_each_stage_depends_on_the_code_it_runs(reproduced):
    """Editing the service re-exports but retrains nothing; editing the engine does both."""
    _, b = reproduced

    def stale(path: str) -> set[str]:
        target = b / path
        original = target.read_text()
        target.write_text(original + "\n# an edit\n")
        try:
            return set(json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], b)))
        finally:
            target.write_text(original)

    assert stale("src/lifelong_hashing/inference/service.py") == {"export"}
    assert stale("src/lifelong_hashing/operations/pipeline.py") == set()
    assert stale("src/lifelong_hashing/engine/codestore.py") == {"train", "export"}


# What the committed dvc.lock was made with (docs/pipeline.md, "Reproducibility"): elsewhere the hashes of
# the trained outputs legitimately differ, and the check below does not apply.
LOCK_RUNTIME = {"cpu_capability": "AVX512", "machine": "x86_64", "torch": "2.13.0+cpu"}


def test_repro_of_the_committed_params_leaves_the_committed_dvc_lock_unchanged(tmp_path):
    """The repository's dvc.lock is what `dvc repro` gives on the machine it was made on (2
    threads, the pinned wheels): a fresh clone reproduces every hash, so `dvc status` and the
    cache mean something."""
    from lifelong_hashing.engine.state import runtime_info

    here = {k: v for k, v in runtime_info(2).items() if k in LOCK_RUNTIME}
    if here != LOCK_RUNTIME:
        pytest.skip(f"dvc.lock was made on {LOCK_RUNTIME}; this machine is {here}")
    clone = clean_clone(tmp_path, small=False)
    sh([sys.executable, "-m", "dvc", "repro"], clone)
    assert sh(["git", "status", "--porcelain", "dvc.lock"], clone) == "", sh(["git", "diff", "dvc.lock"], clone)
