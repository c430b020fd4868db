"""Evidently monitoring on real runs of the Wikipedia data: drift against an iid split and a
shifted batch, forgetting alerts for a forgetting method and a lifelong one, the workspace and
the report as a browser renders it."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from lifelong_hashing.cli import main
from lifelong_hashing.config import MonitoringConfig, load_params
from lifelong_hashing.engine import runner
from lifelong_hashing.engine.batch import Batch
from lifelong_hashing.engine.datasets import load_dataset
from lifelong_hashing.engine.state import load_state
from lifelong_hashing.operations.monitoring import build_report, drift_frames, monitor_state, snapshot_findings

from .conftest import ROOT

pytestmark = pytest.mark.integration

TWO_STAGES = [["art", "biology", "geography", "history"], ["literature", "media"]]


def _wikipedia_params(method: str, **overrides):
    return load_params(ROOT / "params.yaml", {
        "method.name": method, "train.epochs": 10, "train.lifelong_epochs": 10, "train.device": "cpu",
        "stages.groups": TWO_STAGES, "dataset.path": str(ROOT / "data/wikipedia/wikipedia.npz"), **overrides})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """finetune (forgets) and orthohash (lifelong) on the same two Wikipedia stages."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method in ("finetune", "orthohash"):
        params = _wikipedia_params(method)
        runner.run_sequence(params, root / method, quiet=True)
        out[method] = {"params": params, "state_dir": root / method / "state"}
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drift_warnings(reference, current):
    frames = drift_frames({"image": reference.image, "text": reference.text},
                          {"image": current.image, "text": current.text}, projection_dims=8)
    alerts, warnings, values, _ = snapshot_findings(build_report(*frames, MonitoringConfig()))
    assert not alerts
    return warnings, values


def test_drift_is_flagged_for_a_shifted_batch_and_not_for_an_iid_split():
    database = load_dataset(_wikipedia_params("orthohash").dataset, seed=0).database
    rows = np.random.default_rng(0).permutation(len(database))
    reference, current = database.subset(rows[::2]), database.subset(rows[1::2])

    warnings, iid = _drift_warnings(reference, current)
    assert warnings == [], warnings
    assert iid["FeatureDriftShare[image]"] < 0.2 and iid["FeatureDriftShare[text]"] < 0.2

    scaled = current.image * 3
    warnings, values = _drift_warnings(reference, Batch(current.ids, scaled, current.text, current.labels,
                                                        current.categories))
    assert any(w.startswith("FeatureDriftShare[image]") for w in warnings)
    assert any(w.startswith("DriftedColumnsCount[image_pc]") for w in warnings)
    assert not any("[text" in w for w in warnings), "text was left alone and must not drift"

    permuted = current.text[:, np.random.default_rng(1).permutation(current.text.shape[1])]
    warnings, values = _drift_warnings(reference, Batch(current.ids, current.image, permuted, current.labels,
                                                        current.categories))
    assert any(w.startswith("DriftedColumnsCount[text_pc]") for w in warnings)
    # Sparse TF-IDF columns look alike, so a permutation moves fewer of them than it moves PCs.
    assert values["FeatureDriftShare[text]"] > 3 * iid["FeatureDriftShare[text]"]


def test_forgetting_alert_fires_for_finetune_and_not_for_lifelong_orthohash(runs, tmp_path):
    config = MonitoringConfig(max_forgetting=0.3, max_average_map_drop=1.0)
    reports = {m: monitor_state(load_state(r["state_dir"]), config, out_dir=tmp_path / m, workspace=tmp_path / "ws")
               for m, r in runs.items()}
    finetune, lifelong = reports["finetune"], reports["orthohash"]
    assert not finetune.ok and any(a.startswith("Forgetting[") for a in finetune.alerts), finetune.summary()
    assert lifelong.ok, lifelong.summary()
    assert finetune.values["Forgetting[t2i]"] > 0.3 > lifelong.values["Forgetting[t2i]"]
    saved = json.loads(Path(finetune.json_path).read_text())  # what a flow reads
    assert saved["alerts"] == finetune.alerts and saved["stage"] == 1
    assert {t["status"] for t in saved["tests"]} >= {"FAIL", "SUCCESS"}


def test_average_map_drop_alert_follows_its_threshold(runs, tmp_path):
    state = load_state(runs["finetune"]["state_dir"])
    strict = monitor_state(state, MonitoringConfig(max_forgetting=1.0, max_average_map_drop=0.05),
                           out_dir=tmp_path / "strict", workspace=None)
    assert [a.split(":")[0] for a in strict.alerts] == ["AverageMapDrop[i2t]", "AverageMapDrop[t2i]"]
    lenient = monitor_state(state, MonitoringConfig(max_forgetting=1.0, max_average_map_drop=1.0),
                            out_dir=tmp_path / "lenient", workspace=None)
    assert lenient.ok


def test_every_increment_lands_in_the_evidently_workspace(runs, tmp_path):
    from evidently.ui.workspace import Workspace

    state = load_state(runs["orthohash"]["state_dir"])
    config = MonitoringConfig(workspace=str(tmp_path / "ws"))
    first = monitor_state(state, config, stage=0, out_dir=tmp_path / "s0")
    second = monitor_state(state, config, stage=1, out_dir=tmp_path / "s1")
    assert "FeatureDriftShare[image]" not in first.values  # stage 0 has nothing to drift from
    assert "FeatureDriftShare[image]" in second.values and "CodeCollisions[text]" in second.values
    ws = Workspace(str(tmp_path / "ws"))
    (project,) = ws.search_project(config.project)
    assert {str(s) for s in ws.list_runs(project.id)} == {first.snapshot_id, second.snapshot_id}

    # `evidently ui` on that workspace serves the history: one forgetting series across increments.
    port = _free_port()
    ui = subprocess.Popen([str(Path(sys.executable).parent / "evidently"), "ui", "--workspace", str(tmp_path / "ws"),
                           "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path,
                          env={**os.environ, "DO_NOT_TRACK": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + 90
        while True:
            try:
                projects = httpx.get(f"{base}/projects", timeout=5).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and ui.poll() is None, "evidently ui did not start"
                time.sleep(0.5)
        assert [p["name"] for p in projects] == [config.project]
        query = {"series_filter": [{"tags": [], "metadata": {}, "metric": "evidently:metric_v2:Forgetting",
                                    "metric_labels": {"direction": "t2i"}}]}
        history = httpx.post(f"{base}/v2/snapshots/{projects[0]['id']}/data_series_batch", json=query, timeout=30)
        (series,) = history.json()["series"]
        assert series["values"] == pytest.approx([first.values["Forgetting[t2i]"], second.values["Forgetting[t2i]"]])
    finally:
        ui.terminate()
        ui.wait(timeout=30)


def test_cli_monitor_exits_non_zero_on_alerts(runs, tmp_path, capsys):
    params = runs["finetune"]["params"].model_copy(deep=True)
    params.monitoring.max_forgetting = 0.3
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump()))
    code = main(["--params", str(params_file), "monitor", "--state", str(runs["finetune"]["state_dir"]),
                 "--out", str(tmp_path / "report"), "--workspace", str(tmp_path / "ws")])
    out = capsys.readouterr().out
    assert code == 1 and "ALERT   Forgetting[" in out and str(tmp_path / "report" / "report.html") in out
    assert main(["--params", str(params_file), "monitor", "--state", str(runs["finetune"]["state_dir"]),
                 "--stage", "5"]) == 2
    assert "stage 5 is not in this state (stages 0..1)" in capsys.readouterr().err


@pytest.mark.browser
def test_report_renders_in_headless_chromium(runs, tmp_path):
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.fail("Chromium and ChromeDriver are needed (Debian packages chromium, chromium-driver; "
                    "`make test` installs them)")
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    report = monitor_state(load_state(runs["orthohash"]["state_dir"]), MonitoringConfig(), out_dir=tmp_path / "r",
                           workspace=None)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1600", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(Path(report.html_path).resolve().as_uri())
        # The widgets are drawn by the page's JavaScript from the embedded snapshot.
        WebDriverWait(driver, 60).until(lambda d: "Forgetting (text→image)" in d.find_element(By.TAG_NAME, "body").text)
        assert driver.title.startswith("Lifelong hashing increment: stage 1 (orthohash")
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "Colliding codes (image)" in body and "Feature drift share (text)" in body
        png = driver.get_screenshot_as_png()
    finally:
        driver.quit()
    (tmp_path / "report.png").write_bytes(png)
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 50, "screenshot looks blank"
