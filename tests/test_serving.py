"""Export and the retrieval service, on a real Wikipedia model behind a real uvicorn on loopback."""

import itertools
import json
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import onnx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from lifelong_hashing import export as export_module
from lifelong_hashing.cli import main
from lifelong_hashing.config import ExportConfig, load_params
from lifelong_hashing.datasets import load_dataset
from lifelong_hashing.export import ExportError
from lifelong_hashing.onnx_runtime import new_session
from lifelong_hashing.retrieval import QueryError, RetrievalModel
from lifelong_hashing.runner import run_sequence
from lifelong_hashing.state import load_state
from lifelong_hashing.versions import current_version, list_versions, promote, publish

from .conftest import ROOT

WIKI_OVERRIDES = {"method.name": "orthohash", "train.epochs": 12, "train.lifelong_epochs": 12,
                  "model.hidden": [512], "stages.base": 4, "stages.per_stage": 3,
                  "serving.max_body_bytes": 2_000_000, "serving.poll_seconds": 0.2,
                  "export.int8_min_agreement": None}


@pytest.fixture(scope="module")
def wiki(tmp_path_factory):
    """A lifelong OrthoHash model on Wikipedia, published and promoted as v0001."""
    root = tmp_path_factory.mktemp("wiki")
    params = load_params(ROOT / "params.yaml", WIKI_OVERRIDES)
    params = params.model_copy(update={"dataset": params.dataset.model_copy(
        update={"path": str(ROOT / params.dataset.path)})})
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump()))
    run_sequence(params, root / "run", quiet=True)
    state = load_state(root / "run" / "state")
    version = publish(state, root / "models", params.export)
    promote(root / "models", version.name)
    return {"root": root, "params": params, "state": state, "models": root / "models", "version": version,
            "data": load_dataset(params.dataset)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(wiki):
    port = _free_port()
    params = str(wiki["root"] / "params.yaml")
    command = [sys.executable, "-m", "lifelong_hashing.cli", "--params", params, "serve",
               "--models", str(wiki["models"]), "--port", str(port)]
    log = open(wiki["root"] / "serve.log", "w")  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("service did not start: " + (wiki["root"] / "serve.log").read_text())
    yield url
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


def test_export_parity_metadata_and_dynamic_batch(wiki):
    manifest = json.loads((wiki["version"] / "manifest.json").read_text())
    for modality, dim in (("image", 128), ("text", 1000)):
        entry = manifest["encoders"][modality]
        assert entry["parity"]["bit_agreement"] == 1.0 and entry["parity"]["max_abs_diff"] < 1e-2
        model = onnx.load(wiki["version"] / entry["file"])
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["model_version"] == "v0001" and meta["bits"] == "64" and meta["input_dim"] == str(dim)
        assert meta["vocabulary_hash"] == manifest["vocabulary_hash"] and meta["project_version"]
        assert manifest["opset"] == export_module.OPSET and not list(wiki["version"].glob("*.data"))
        session = new_session(wiki["version"] / entry["file"])
        for n in (1, 7):
            code, bits = session.run(None, {"features": np.ones((n, dim), np.float32)})
            assert code.shape == (n, 64) and bits.shape == (n, 8) and bits.dtype == np.uint8
        assert "int8" not in entry and not (wiki["version"] / f"{modality}.int8.onnx").exists()


def test_int8_copies_are_kept_only_when_they_agree_with_fp32(wiki, tmp_path):
    version = publish(wiki["state"], tmp_path / "models", ExportConfig(int8_min_agreement=0.99))
    for modality in ("image", "text"):
        int8 = json.loads((version / "manifest.json").read_text())["encoders"][modality]["int8"]
        assert int8["used"] == (int8["bit_agreement"] >= 0.99) and int8["threshold"] == 0.99
        assert (version / f"{modality}.int8.onnx").exists() == int8["used"]


def test_export_that_fails_parity_is_an_error_and_leaves_no_version(wiki, monkeypatch, tmp_path):
    def disagreeing(method, modality, path):
        return export_module.Parity(0.5, 0.97, 256)

    monkeypatch.setattr(export_module, "check_parity", disagreeing)
    with pytest.raises(ExportError, match=r"agree on 97.0000% of 256 rows, not 100 %"):
        publish(wiki["state"], tmp_path / "models", ExportConfig(int8_min_agreement=None))
    assert list_versions(tmp_path / "models") == []
    assert [p.name for p in (tmp_path / "models" / "versions").iterdir()] == []


def test_text_query_returns_images_of_its_category(wiki, server):
    queries = wiki["data"].queries
    rows = np.random.default_rng(0).choice(len(queries), 120, replace=False)
    reply = httpx.post(server + "/search", json={"modality": "text", "k": 10,
                                                 "features": queries.text[rows].tolist()}, timeout=60)
    assert reply.status_code == 200, reply.text
    names = queries.categories
    precision = []
    for row, result in zip(rows, reply.json()["results"], strict=True):
        mine = {names[c] for c in np.flatnonzero(queries.labels[row])}
        precision.append(np.mean([bool(mine & set(h["labels"])) for h in result["image"]]))
    chance = (queries.labels.sum(axis=0) / len(queries)) @ (queries.labels.sum(axis=0) / len(queries))
    assert np.mean(precision) > 3 * chance, (np.mean(precision), chance)


def test_version_and_health_tell_the_truth(wiki, server):
    info = httpx.get(server + "/version").json()
    assert info["model_version"] == current_version(wiki["models"]) == "v0001"
    assert info["bits"] == 64 and info["database_size"] == len(wiki["state"].store)
    assert info["categories"] == list(wiki["state"].method.categories)
    assert info["providers"] == ["CPUExecutionProvider"] or "CUDAExecutionProvider" in info["providers"]
    assert httpx.get(server + "/docs").status_code == 200
    assert "/search" in httpx.get(server + "/openapi.json").json()["paths"]


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"modality": "image", "features": [[0.1] * 5]}, 422, "image features must have shape [128] per row, got [5]"),
    ({"modality": "text", "features": [[float("nan")] * 1000]}, 422, "NaN or infinite"),
    ({"modality": "text", "features": [[1e39] * 1000]}, 422, "beyond float32"),
    ({"modality": "text", "features": []}, 422, "body.features: List should have at least 1 item"),
    ({"modality": "image", "features": [[0.1] * 128], "k": 0}, 422, "body.k: Input should be greater than or equal"),
    ({"modality": "image", "features": [[0.1] * 128], "k": 5000}, 422, "less than or equal to 1000"),
    ({"modality": "audio", "features": [[0.1] * 128]}, 422, "body.modality"),
    ({"modality": "image"}, 422, "send exactly one of 'features' or 'words'"),
    ({"modality": "text", "words": [["war"]]}, 422, "no text vocabulary"),
    ({"modality": "image", "features": [[0.1] * 128], "radius": 99}, 422, "radius must be within 0..64"),
])
def test_bad_requests_get_a_clear_4xx(server, body, status, words):
    reply = httpx.post(server + "/search", content=json.dumps(body), headers={"content-type": "application/json"})
    assert reply.status_code == status and words in reply.json()["detail"], reply.text


def test_malformed_and_oversize_bodies(server):
    json_type = {"content-type": "application/json"}
    reply = httpx.post(server + "/search", content=b'{"modality": "image",', headers=json_type)
    assert reply.status_code == 422 and "JSON decode error" in reply.json()["detail"]
    big = json.dumps({"modality": "text", "features": [[0.123456789] * 1000] * 250})
    reply = httpx.post(server + "/encode", content=big, headers=json_type)
    assert reply.status_code == 413 and "larger than 2000000 bytes" in reply.json()["detail"]


def test_hot_swap_keeps_serving_and_refuses_a_broken_version(wiki, server):
    models = wiki["models"]
    second = publish(wiki["state"], models, ExportConfig(int8_min_agreement=None))
    body = {"modality": "image", "features": wiki["data"].queries.image[:4].tolist(), "k": 5}
    statuses, stop = [], threading.Event()

    def hammer():
        with httpx.Client() as client:
            while not stop.is_set():
                statuses.append(client.post(server + "/search", json=body, timeout=30).status_code)

    worker = threading.Thread(target=hammer)
    worker.start()
    promote(models, second.name)
    _wait_for_version(server, second.name)
    stop.set()
    worker.join()
    assert statuses and set(statuses) == {200}

    broken = models / "versions" / "v0099"
    shutil.copytree(second, broken)
    (broken / "image.onnx").write_bytes(b"not an onnx model")
    promote(models, "v0099")
    time.sleep(1.5)
    info = httpx.get(server + "/version").json()
    assert info["model_version"] == second.name and "refused version v0099" in info["last_error"]
    assert httpx.post(server + "/search", json=body).status_code == 200
    promote(models, "v0001")  # rollback
    _wait_for_version(server, "v0001")


def _wait_for_version(url: str, name: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if httpx.get(url + "/version").json()["model_version"] == name:
            return
        time.sleep(0.1)
    pytest.fail(f"service never switched to {name}")


def test_cli_search_on_service_models_and_state(wiki, server, tmp_path, capsys):
    features = tmp_path / "q.npy"
    np.save(features, wiki["data"].queries.text[:2])
    params = str(wiki["root"] / "params.yaml")
    state = str(wiki["root"] / "run" / "state")
    for where in (["--url", server], ["--models", str(wiki["models"])], ["--state", state]):
        assert main(["--params", params, "search", *where, "--modality", "text", "--features-file", str(features),
                     "--k", "3"]) == 0
        out = capsys.readouterr().out
        assert out.count("query 0 → image:") == 1 and "  3  " in out
    assert main(["--params", params, "search", "--url", server, "--modality", "image", "--features-file",
                 str(features)]) == 2
    assert "answered 422" in capsys.readouterr().err


def test_fuzz_api_from_its_openapi_spec(server):
    """Schemathesis cases (valid and invalid) for every operation of the live spec: no 5xx, and
    every response as documented."""
    schema = schemathesis.openapi.from_url(server + "/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} == {"/health", "/version", "/encode", "/search"}
    for operation, mode in itertools.product(operations, schemathesis.GenerationMode):
        if operation.method.upper() == "GET" and mode is schemathesis.GenerationMode.NEGATIVE:
            continue  # no inputs to break

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)
        def call(case):
            case.call_and_validate(base_url=server, checks=checks)

        call()


def test_word_queries_use_the_training_vocabulary(tmp_path):
    """A dataset that names its text columns gets word queries: counts × idf, L2-normalized."""
    rng = np.random.default_rng(0)
    n, words = 400, [f"w{i}" for i in range(30)]
    labels = rng.integers(4, size=n)
    counts = rng.poisson(0.3, size=(n, 30)).astype(np.float32)
    counts[np.arange(n), labels * 5] += 3  # each class has a signature word
    idf = np.log(n / (1 + (counts > 0).sum(axis=0))).astype(np.float32)
    text = counts * idf
    text /= np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-6)
    image = (np.eye(4)[labels] @ rng.normal(size=(4, 16)) + 0.3 * rng.normal(size=(n, 16))).astype(np.float32)
    np.savez(tmp_path / "tags.npz", image=image, text=text.astype(np.float32), label=labels, vocab=np.array(words),
             idf=idf)
    params = load_params(ROOT / "params.yaml", {
        "dataset": {"kind": "npz", "path": str(tmp_path / "tags.npz"), "name": "tags", "image_key": "image",
                    "text_key": "text", "labels_key": "label", "categories_key": None, "ids_key": None,
                    "split_key": None, "query_size": 50, "vocabulary_key": "vocab", "idf_key": "idf",
                    "text_l2_normalize": True},
        "stages.base": 2, "model.hidden": [32], "model.bits": 16, "train.epochs": 15, "train.lifelong_epochs": 5,
        "method.name": "finetune"})
    run_sequence(params, tmp_path / "run", quiet=True)
    state = load_state(tmp_path / "run" / "state")
    version = publish(state, tmp_path / "models", ExportConfig(int8_min_agreement=None))
    model = RetrievalModel(version)
    x = model.features("text", words=[["w5", "w5", "w7", "unknown"]])
    expected = np.zeros(30, np.float32)
    expected[[5, 7]] = [2 * idf[5], idf[7]]
    np.testing.assert_allclose(x[0], expected / np.linalg.norm(expected), rtol=1e-5)
    hits = model.search("text", x, 5, None, ("image",))[0]["image"]
    assert len(hits) == 5 and model.info()["text_vocabulary"] is True
    with pytest.raises(QueryError, match="none of the words"):
        model.features("text", words=[["nothing", "known"]])
    with pytest.raises(QueryError, match="text modality only"):
        model.features("image", words=[["w1"]])
