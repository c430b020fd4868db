"""Export and the retrieval service, on a real Wikipedia model behind a real uvicorn on loopback."""

import base64
import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import schemathesis
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from lifelong_hashing.cli import main
from lifelong_hashing.config import ExportConfig, IndexConfig, load_params
from lifelong_hashing.engine.codestore import ItemFilter, hamming_distances
from lifelong_hashing.engine.datasets import load_dataset
from lifelong_hashing.engine.runner import run_sequence
from lifelong_hashing.engine.state import load_state
from lifelong_hashing.inference import export as export_module
from lifelong_hashing.inference.export import ExportError, publish
from lifelong_hashing.inference.indexes import tie_aware_recall
from lifelong_hashing.inference.onnx_runtime import new_session
from lifelong_hashing.inference.retrieval import QueryError, RetrievalModel
from lifelong_hashing.inference.versions import VersionError, current_version, list_versions, promote

from .conftest import ROOT, free_port, running_service

pytestmark = pytest.mark.integration

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


@pytest.fixture(scope="module")
def server(wiki):
    with running_service(wiki, wiki["models"], "main") as (url, _):
        assert httpx.get(url + "/health").status_code == 200
        yield url


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


def test_a_version_takes_the_last_ones_encoders_when_they_did_not_change(wiki, tmp_path, monkeypatch):
    """An append of known items leaves the encoders as they were: the next version copies their
    graphs with its own metadata instead of running the exporter; a changed weight exports again."""
    exported = []
    real_export = export_module.export_encoder

    def counted(method, modality, *args, **kwargs):
        exported.append(modality)
        return real_export(method, modality, *args, **kwargs)

    monkeypatch.setattr(export_module, "export_encoder", counted)
    models = tmp_path / "models"
    again = publish(wiki["state"], models, ExportConfig(int8_min_agreement=None), 5, previous=wiki["version"])
    assert exported == []
    before, after = (json.loads((v / "manifest.json").read_text())["encoders"] for v in (wiki["version"], again))
    for modality in ("image", "text"):
        assert after[modality]["fingerprint"] == before[modality]["fingerprint"]
        old, new = (onnx.load(v / f"{modality}.onnx") for v in (wiki["version"], again))
        assert old.graph == new.graph
        assert {p.key: p.value for p in new.metadata_props}["model_version"] == again.name == "v0005"
        x = np.ones((3, 128 if modality == "image" else 1000), np.float32)
        assert (new_session(again / f"{modality}.onnx").run(["bits"], {"features": x})[0]
                == new_session(wiki["version"] / f"{modality}.onnx").run(["bits"], {"features": x})[0]).all()
    net = wiki["state"].method.nets()["text"]
    with torch.no_grad():
        net.head.bias[0] += 1.0
    try:
        changed = publish(wiki["state"], models, ExportConfig(int8_min_agreement=None), previous=again)
    finally:
        with torch.no_grad():
            net.head.bias[0] -= 1.0
    assert exported == ["text"]
    assert json.loads((changed / "manifest.json").read_text())["encoders"]["text"]["fingerprint"] != \
        after["text"]["fingerprint"]


def test_int8_copies_are_kept_only_when_they_agree_with_fp32(wiki, tmp_path):
    version = publish(wiki["state"], tmp_path / "models", ExportConfig(int8_min_agreement=0.99))
    for modality in ("image", "text"):
        int8 = json.loads((version / "manifest.json").read_text())["encoders"][modality]["int8"]
        assert int8["used"] == (int8["bit_agreement"] >= 0.99) and int8["threshold"] == 0.99
        assert (version / f"{modality}.int8.onnx").exists() == int8["used"]


def test_export_that_fails_parity_is_an_error_and_leaves_no_version(wiki, monkeypatch, tmp_path):
    def disagreeing(method, modality, path, photos=()):
        return export_module.Parity(0.5, 0.97, 256)

    monkeypatch.setattr(export_module, "check_parity", disagreeing)
    with pytest.raises(ExportError, match=r"agree on 97.0000% of 256 rows, not 100 %"):
        publish(wiki["state"], tmp_path / "models", ExportConfig(int8_min_agreement=None))
    assert list_versions(tmp_path / "models") == []
    assert [p.name for p in (tmp_path / "models" / "versions").iterdir()] == []


@pytest.mark.parametrize("kind", ["ivf", "multihash"])
def test_an_approximate_index_is_built_at_export_versioned_and_served(wiki, tmp_path, kind):
    """The version carries its index files and their measured recall; the model searches them,
    and every hit it returns is at its true distance, as near as exact search finds."""
    version = publish(wiki["state"], tmp_path / "models", ExportConfig(int8_min_agreement=None),
                      index=IndexConfig(kind=kind, ivf_lists=16, ivf_probes=4))
    entry = json.loads((version / "manifest.json").read_text())["index"]
    assert entry["kind"] == kind and set(entry["modalities"]) == {"image", "text"}
    for built in entry["modalities"].values():
        assert (version / built["file"]).stat().st_size > 0 and built["build_seconds"] >= 0
        assert 0.5 < built["recall_at_100"] <= 1.0, built
    model = RetrievalModel(version)
    assert model.info()["index"]["kind"] == kind
    queries = wiki["data"].queries
    x = model.features("text", queries.text[:50].tolist())
    codes = model.encode("text", x)
    idx, dist = model.top_k(codes, "image", 100, None)
    _, exact = wiki["state"].store.search(codes, "image", 100)
    true = hamming_distances(codes, wiki["state"].store.codes["image"])
    found = idx >= 0
    np.testing.assert_array_equal(np.take_along_axis(true, np.where(found, idx, 0), 1)[found], dist[found])
    assert tie_aware_recall(exact, dist) > 0.5
    served = model.search("text", x[:20], 5, None, ("image",))
    ids = set(wiki["state"].store.ids)
    assert any(r["image"] for r in served) and all(h["id"] in ids for r in served for h in r["image"])
    where = ItemFilter(any_of=(wiki["state"].store.categories[-1],))  # a filtered search is exact, index or not
    filtered = model.search("text", x[:20], 100, None, ("image",), where)
    exact = wiki["state"].store.search(codes[:20], "image", 100, where=where)[0]
    assert [[h["id"] for h in r["image"]] for r in filtered] == wiki["state"].store.ids[exact].tolist()


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


def test_concurrent_queries_batched_together_get_their_own_answers(wiki, server):
    """Requests that arrive together are encoded and searched as one batch; each must still get
    exactly the reply it gets alone, including one whose radius differs (a different batch key)
    and large ones (over serving.inline_hits: batched on the search threads, not the loop)."""
    queries = wiki["data"].queries
    bodies = [{"modality": "text", "k": 7, "features": [queries.text[i].tolist()]} for i in range(24)]
    bodies += [{"modality": "image", "k": 5, "radius": 20, "features": queries.image[i:i + 3].tolist()}
               for i in range(8)]
    bodies += [{"modality": "image", "k": 300, "target": "both", "features": queries.image[i:i + 2].tolist()}
               for i in range(6)]
    with httpx.Client(base_url=server, timeout=60) as session:
        alone = [session.post("/search", json=b).json() for b in bodies]
    together: list = [None] * len(bodies)

    def post(i: int) -> None:
        with httpx.Client(base_url=server, timeout=60) as session:
            together[i] = session.post("/search", json=bodies[i]).json()

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert all(len(hits) <= 5 and all(h["distance"] <= 20 for h in hits)
               for reply in alone[24:32] for result in reply["results"] for hits in result.values())
    assert all(len(hits) == 300 for reply in alone[32:] for result in reply["results"] for hits in result.values())


def test_version_and_health_tell_the_truth(wiki, server):
    info = httpx.get(server + "/version").json()
    assert info["model_version"] == current_version(wiki["models"]) == "v0001"
    assert info["bits"] == 64 and info["database_size"] == len(wiki["state"].store)
    assert info["categories"] == list(wiki["state"].method.categories)
    assert info["providers"] == ["CPUExecutionProvider"] or "CUDAExecutionProvider" in info["providers"]
    assert httpx.get(server + "/docs").status_code == 200
    spec = httpx.get(server + "/openapi.json").json()
    assert spec["components"]["securitySchemes"]["ApiKey"] == {
        "type": "apiKey", "in": "header", "name": "X-API-Key",
        "description": "the service's key (LHASH_API_KEY), when one is set"}
    for path, method in (("/search", "post"), ("/encode", "post"), ("/version", "get"), ("/delete", "post")):
        assert spec["paths"][path][method]["security"] == [{"ApiKey": []}], path
    assert "security" not in spec["paths"]["/health"]["get"]  # open, for load balancers
    typed = spec["paths"]["/version"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert typed == {"$ref": "#/components/schemas/VersionResponse"}
    assert {"bits", "categories", "hidden"} <= set(spec["components"]["schemas"]["VersionResponse"]["required"])


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"modality": "image", "features": [[0.1] * 5]}, 422, "image features must have shape [128] per row, got [5]"),
    ({"modality": "text", "features": [[float("nan")] * 1000]}, 422, "NaN or infinite"),
    ({"modality": "text", "features": [[1e39] * 1000]}, 422, "beyond float32"),
    ({"modality": "text", "features": []}, 422, "body.features: List should have at least 1 item"),
    ({"modality": "image", "features": [[0.1] * 128], "k": 0}, 422, "body.k: Input should be greater than or equal"),
    ({"modality": "image", "features": [[0.1] * 128], "k": 5000}, 422, "less than or equal to 1000"),
    ({"modality": "audio", "features": [[0.1] * 128]}, 422, "body.modality"),
    ({"modality": "image"}, 422, "send exactly one of 'features', 'words' or a photo"),
    ({"modality": "image", "images": [base64.b64encode(b"\xff\xd8\xff" + b"0" * 50).decode()]}, 422,
     "this version's image encoder takes feature vectors"),
    ({"modality": "text", "features": [[0.1] * 1000], "words": [["war"]]}, 422, "send exactly one of"),
    ({"modality": "text", "words": [["war"]]}, 422, "no text vocabulary"),
    ({"modality": "image", "features": [[0.1] * 128], "radius": 99}, 422, "radius must be within 0..64"),
    ({"modality": "image", "features": [["0.1"] * 128]}, 422, "Input should be a valid number"),
    ({"modality": "image", "features": [[True] * 128]}, 422, "Input should be a valid number"),
    ({"modality": "image", "features": [[0.1] * 128], "k": "5"}, 422, "body.k: Input should be a valid integer"),
    ({"modality": "image", "features": [[0.1] * 128], "k": 5.0}, 422, "body.k: Input should be a valid integer"),
    ({"modality": "image", "features": [[0.1] * 128] * 256, "k": 1000, "target": "both"}, 422,
     "asks for 512,000 hits (queries × k × targets), over the limit of 50,000"),
])
def test_bad_requests_get_a_clear_4xx(server, body, status, words):
    reply = httpx.post(server + "/search", content=json.dumps(body), headers={"content-type": "application/json"})
    assert reply.status_code == status and words in reply.json()["detail"], reply.text


def test_search_within_a_filter_returns_k_hits_that_pass_it(wiki, server):
    store, queries = wiki["state"].store, wiki["data"].queries
    late = store.categories[-1]
    body = {"modality": "text", "k": 50, "features": queries.text[:30].tolist()}
    plain = httpx.post(server + "/search", json=body).json()["results"]
    assert any(late not in h["labels"] for r in plain for h in r["image"])
    for where, passes in [({"any_of": [late]}, lambda h: late in h["labels"]),
                          ({"stages": [1, 1]}, lambda h: h["stage"] == 1),
                          ({"id_prefix": store.ids[7][:-1]}, lambda h: h["id"].startswith(store.ids[7][:-1]))]:
        allowed = ItemFilter(**{k: tuple(v) if k != "id_prefix" else v for k, v in where.items()}).allowed(store)
        reply = httpx.post(server + "/search", json={**body, "filter": where})
        assert reply.status_code == 200, reply.text
        for result in reply.json()["results"]:
            assert len(result["image"]) == min(50, allowed.sum()) and all(map(passes, result["image"])), where
    for where, words in [({"any_of": ["zebra"]}, "filter: unknown categories ['zebra']"),
                         ({"stages": [2, 1]}, "the first is after the last"),
                         ({"colour": "red"}, "body.filter.colour: Extra inputs are not permitted")]:
        reply = httpx.post(server + "/search", json={**body, "filter": where})
        assert reply.status_code == 422 and words in reply.json()["detail"], reply.text


def test_malformed_and_oversize_bodies(server):
    json_type = {"content-type": "application/json"}
    reply = httpx.post(server + "/search", content=b'{"modality": "image",', headers=json_type)
    assert reply.status_code == 422 and "Invalid JSON: EOF while parsing" in reply.json()["detail"]
    big = json.dumps({"modality": "text", "features": [[0.123456789] * 1000] * 250})
    reply = httpx.post(server + "/encode", content=big, headers=json_type)
    assert reply.status_code == 413 and "larger than 2000000 bytes" in reply.json()["detail"]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_the_asgi_app_serves_without_importing_torch(wiki):
    """``uvicorn serving.app:app`` needs ONNX Runtime and faiss, not PyTorch (nor the training
    stack): start-up, a search and the version info, then a look at sys.modules."""
    script = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "import serving.app\n"
        "with TestClient(serving.app.app, base_url='http://127.0.0.1') as client:\n"
        "    body = {'modality': 'image', 'features': [[0.1] * 128], 'k': 3}\n"
        "    assert client.post('/search', json=body).status_code == 200\n"
        "    assert client.get('/version').json()['model_version'] == 'v0001'\n"
        "heavy = {'torch', 'great_expectations', 'evidently', 'prefect'}\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & heavy)\n"
        "print('heavy:', heavy)\n")
    env = {**os.environ, "LHASH_MODELS_DIR": str(wiki["models"]), "LHASH_PARAMS": str(wiki["root"] / "params.yaml")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "heavy: []" in proc.stdout


def test_a_chunked_upload_is_cut_off_at_the_byte_limit(wiki):
    """No Content-Length: the bytes are counted as they arrive, and 413 comes at the limit, with
    the server's memory unchanged and /health answering."""
    with running_service(wiki, wiki["models"], "chunked") as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        before = _rss_mb(proc.pid)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(b"POST /encode HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b"[" + b"0.123456789," * 8000
            sent, reply = 0, b""
            try:
                while sent < 100_000_000 and b"\r\n\r\n" not in reply:
                    conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
                    conn.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        reply += conn.recv(65536)
                    conn.setblocking(True)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server hung up after answering
            conn.settimeout(10)
            with contextlib.suppress(OSError):
                reply += conn.recv(65536)
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert b"larger than 2000000 bytes" in reply and sent < 10_000_000
        assert _rss_mb(proc.pid) - before < 100
        assert httpx.get(url + "/health", timeout=5).status_code == 200


def test_a_broken_current_at_start_up_falls_back_to_the_newest_version_that_loads(wiki, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(wiki["models"] / "versions" / "v0001", models / "versions" / "v0001")
    shutil.copytree(wiki["models"] / "versions" / "v0001", models / "versions" / "v0002")
    (models / "versions" / "v0002" / "text.onnx").write_bytes(b"truncated")
    (models / "CURRENT").write_text("v0002\n")
    with running_service(wiki, models, "fallback") as (url, _):
        assert httpx.get(url + "/health").json() == {"status": "ok", "model_version": "v0001"}
        info = httpx.get(url + "/version").json()
        assert info["model_version"] == "v0001" and "fell back to v0001" in info["fallback"]
        assert "refused version v0002" in info["fallback"]


def test_api_key_and_trusted_host(wiki):
    with running_service(wiki, wiki["models"], "key", env={"LHASH_API_KEY": "s3cret"}) as (url, _):
        assert httpx.get(url + "/health").status_code == 200  # probes need no key
        for path in ("/version", "/openapi.json", "/docs"):
            reply = httpx.get(url + path)
            assert reply.status_code == 401 and "X-API-Key" in reply.json()["detail"]
            assert httpx.get(url + path, headers={"X-API-Key": "wrong"}).status_code == 401
        assert httpx.get(url + "/version", headers={"X-API-Key": "s3cret"}).status_code == 200
        body = {"modality": "image", "features": wiki["data"].queries.image[:1].tolist()}
        assert httpx.post(url + "/search", json=body).status_code == 401
        assert httpx.post(url + "/search", json=body, headers={"X-API-Key": "s3cret"}).status_code == 200
        rebound = httpx.get(url + "/health", headers={"Host": "attacker.example"})  # DNS rebinding
        assert rebound.status_code == 400


def generated_client(spec: bytes, out: Path, package: str):
    """The client ``openapi-python-client`` generates from ``spec``, imported as ``package``."""
    import importlib

    (out / "spec.json").write_bytes(spec)
    (out / "config.yaml").write_text(f"package_name_override: {package}\n")
    proc = subprocess.run([str(Path(sys.executable).parent / "openapi-python-client"), "generate", "--path",
                           str(out / "spec.json"), "--output-path", str(out / package), "--meta", "none",
                           "--config", str(out / "config.yaml")], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert proc.returncode == 0 and "Warning" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    # The one known defect of openapi-python-client 0.29 (issue #1451, fix in PR #1478): a body
    # with two content types (/encode and /search take JSON or multipart) is annotated
    # "| Unset" without importing Unset. Add the import; everything else is as generated.
    for module in (out / package / "api").rglob("*.py"):
        text = module.read_text()
        if "| Unset" in text and "import UNSET, Response\n" in text:
            module.write_text(text.replace("import UNSET, Response\n", "import UNSET, Response, Unset\n"))
    sys.path.insert(0, str(out))
    try:
        return (importlib.import_module(package), importlib.import_module(f"{package}.models"),
                importlib.import_module(f"{package}.api.default.version_version_get"),
                importlib.import_module(f"{package}.api.default.search_search_post"))
    finally:
        sys.path.remove(str(out))


@pytest.mark.parametrize("key", ["s3cret", None])
def test_a_client_generated_from_the_spec_reads_the_version_and_searches(wiki, tmp_path, key):
    """The spec is complete enough for a generator: every body a named schema, the key a
    security scheme. The generated client's answers are the service's own, parsed."""
    env = {"LHASH_API_KEY": key} if key else {"LHASH_API_KEY": ""}
    with running_service(wiki, wiki["models"], f"client-{bool(key)}", env=env) as (url, _):
        headers = {"X-API-Key": key} if key else {}
        spec = httpx.get(url + "/openapi.json", headers=headers).content
        package, models, version, search = generated_client(spec, tmp_path, f"lhash_client_{bool(key)}".lower())
        client = (package.AuthenticatedClient(base_url=url, token=key, prefix="", auth_header_name="X-API-Key")
                  if key else package.Client(base_url=url))
        info = version.sync(client=client)
        assert isinstance(info, models.VersionResponse) and info.model_version == wiki["version"].name
        features = wiki["data"].queries.text[:2].tolist()
        body = models.SearchRequest(modality=models.SearchRequestModality.TEXT, features=features, k=5,
                                    filter_=models.SearchFilter(any_of=["art", "history"]))
        found = search.sync(client=client, body=body)
        assert isinstance(found, models.SearchResponse) and len(found.results) == 2
        raw = httpx.post(url + "/search", headers=headers, json={
            "modality": "text", "features": features, "k": 5, "filter": {"any_of": ["art", "history"]}}).json()
        assert found.to_dict() == raw and all(len(row["image"]) == 5 for row in raw["results"])
        if key:  # the same client without the key: the 401 is a parsed Problem naming the header
            refused = version.sync(client=package.Client(base_url=url))
            assert isinstance(refused, models.Problem) and "X-API-Key" in refused.detail


def test_idle_connections_are_closed_and_cannot_exhaust_the_server(wiki):
    """Connections that never send a request are closed after the header timeout, those beyond
    max_connections at once: the server's descriptors stay bounded and /health comes back."""
    serving = {"max_connections": 50, "header_timeout_seconds": 1.0}
    with running_service(wiki, wiki["models"], "idle", serving) as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
        try:
            time.sleep(0.5)
            assert len(os.listdir(f"/proc/{proc.pid}/fd")) < 50 + 60
            deadline, status = time.time() + 20, None
            while time.time() < deadline and status != 200:
                with contextlib.suppress(httpx.HTTPError):
                    status = httpx.get(url + "/health", timeout=2).status_code
                time.sleep(0.2)
            assert status == 200
            for conn in idle[:5]:
                conn.settimeout(5)
                assert conn.recv(1) == b""  # closed by the server
        finally:
            for conn in idle:
                conn.close()


def _health_while(url: str, seconds: float) -> list[float]:
    """/health's latencies (s), polled for ``seconds``; an error counts as infinitely slow."""
    latencies, end = [], time.time() + seconds
    while time.time() < end:
        start = time.perf_counter()
        try:
            ok = httpx.get(url + "/health", timeout=3).status_code == 200
        except httpx.HTTPError:
            ok = False
        latencies.append(time.perf_counter() - start if ok else float("inf"))
        time.sleep(0.1)
    return latencies


def test_slow_bodies_get_408_at_the_request_deadline_and_health_keeps_answering(wiki):
    """300 clients send POST headers declaring 100 kB, then a byte a second: /health answers all
    along, and each slow request is told 408 and closed at serving.request_timeout_seconds."""
    serving = {"request_timeout_seconds": 4.0}
    with running_service(wiki, wiki["models"], "slow-body", serving) as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        slow = []
        for _ in range(300):
            conn = socket.create_connection(("127.0.0.1", port))
            conn.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000\r\n\r\n{")
            slow.append(conn)
        stop = threading.Event()

        def trickle():
            while not stop.wait(1.0):
                for conn in slow:
                    with contextlib.suppress(OSError):
                        conn.send(b" ")

        feeder = threading.Thread(target=trickle, daemon=True)
        feeder.start()
        try:
            latencies = _health_while(url, 3.0)
            assert max(latencies) < 1.0, sorted(latencies)[-5:]
            time.sleep(3.0)  # past the deadline
            replies = []
            for conn in slow[:20]:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    replies.append(conn.recv(200))
            assert replies and all(r.startswith(b"HTTP/1.1 408") for r in replies), replies[:3]
        finally:
            stop.set()
            for conn in slow:
                conn.close()
        assert httpx.get(url + "/health", timeout=5).status_code == 200


def test_headers_past_the_size_limit_get_431_and_hold_no_memory(wiki):
    """A 1 MB header is refused with 431; 30 clients sending 40 MB of unfinished headers are cut
    off after serving.max_header_bytes each, and the server's memory stays where it was."""
    with running_service(wiki, wiki["models"], "headers") as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        reply = httpx.get(url + "/health", headers={"X-Big": "a" * 1_000_000}, timeout=10)
        assert reply.status_code == 431
        assert httpx.get(url + "/health", headers={"X-Fine": "a" * 30_000}).status_code == 200
        before = _rss_mb(proc.pid)

        def flood(sent: list[int]):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Flood: ")
                try:
                    for _ in range(40):
                        conn.sendall(b"a" * 1_000_000)
                        sent[0] += 1_000_000
                except OSError:
                    pass  # cut off

        counts = [[0] for _ in range(30)]
        threads = [threading.Thread(target=flood, args=(c,)) for c in counts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert max(c[0] for c in counts) < 40_000_000  # nobody got to send it all
        assert _rss_mb(proc.pid) - before < 50
        assert httpx.get(url + "/health", timeout=5).status_code == 200


def test_uvicorn_is_the_pinned_version_and_its_cli_runs_the_guard(wiki):
    """The guard extends a class uvicorn does not document: the installed uvicorn must be the
    pinned minor version, and ``uvicorn serving.app:app --http serving.app:http`` must apply it
    (without ``--http`` the app says it is unguarded)."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement

    pins = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    (pin,) = [r for r in pins if r.name == "uvicorn"]
    assert pin.specifier.contains(importlib.metadata.version("uvicorn"))
    env = {**os.environ, "LHASH_MODELS_DIR": str(wiki["models"]), "LHASH_PARAMS": str(wiki["root"] / "params.yaml")}
    for guarded in (True, False):
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", "serving.app:app", "--port", str(port),
                   *(["--http", "serving.app:http"] if guarded else [])]
        log_path = wiki["root"] / f"uvicorn-{guarded}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                url = f"http://127.0.0.1:{port}"
                deadline = time.time() + 90
                while time.time() < deadline:
                    with contextlib.suppress(httpx.HTTPError):
                        if httpx.get(url + "/health", timeout=2).status_code == 200:
                            break
                    time.sleep(0.3)
                status = httpx.get(url + "/health", headers={"X-Big": "a" * 1_000_000}, timeout=10).status_code
                assert (status == 431) == guarded, log_path.read_text()[-2000:]
            finally:
                proc.terminate()
                proc.wait(20)
        assert ("without the connection guard" in log_path.read_text()) != guarded


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

    broken = publish(wiki["state"], models, ExportConfig(int8_min_agreement=None))
    good_bytes = (broken / "image.onnx").read_bytes()
    (broken / "image.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(VersionError, match=f"refusing to promote {broken.name}"):
        promote(models, broken.name)  # promotion loads and test-encodes first
    assert current_version(models) == second.name

    (models / "CURRENT").write_text(broken.name + "\n")  # as if written by hand, or by an older release
    time.sleep(1.5)
    info = httpx.get(server + "/version").json()
    assert info["model_version"] == second.name and f"refused version {broken.name}" in info["last_error"]
    assert httpx.post(server + "/search", json=body).status_code == 200
    (broken / "image.onnx").write_bytes(good_bytes)  # repaired: its files changed, so it is tried again
    _wait_for_version(server, broken.name)

    (models / "CURRENT").write_text("../../elsewhere\n")  # a name, never a path
    time.sleep(1.5)
    info = httpx.get(server + "/version").json()
    assert info["model_version"] == broken.name and "not a version under" in info["last_error"]
    with pytest.raises(VersionError, match="not a version"):
        current_version(models)
    misnamed = models / "versions" / "v0099"
    shutil.copytree(second, misnamed)  # a copied folder: its manifest names another version
    with pytest.raises(VersionError, match="names version v0002"):
        promote(models, "v0099")
    shutil.rmtree(misnamed)
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
        late = wiki["state"].store.categories[-1]
        assert main(["--params", params, "search", *where, "--modality", "text", "--features-file", str(features),
                     "--k", "4", "--any-of", late, "--stages", "1:2"]) == 0
        hits = [line.split() for line in capsys.readouterr().out.splitlines() if "distance" in line]
        assert len(hits) == 8 and all(late in h[-1].split(",") and h[5] in ("1", "2") for h in hits), hits
    assert main(["--params", params, "search", "--url", server, "--modality", "image", "--features-file",
                 str(features)]) == 2
    assert "answered 422" in capsys.readouterr().err


def test_fuzz_api_from_its_openapi_spec(server):
    """Schemathesis cases (valid and invalid) for every operation of the live spec: no 5xx, and
    every response as documented."""
    schema = schemathesis.openapi.from_url(server + "/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} == {"/health", "/version", "/encode", "/search", "/delete"}
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
    idf[29] = 0.0  # a word in every text: it carries no weight at query time
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
    with pytest.raises(QueryError, match="none of the words") as refused:  # a megabyte is not echoed back
        model.features("text", words=[["x" * 10**6, *map(str, range(20))]])
    assert len(str(refused.value)) < 400 and "1,000,000 characters" in str(refused.value)
    with pytest.raises(QueryError, match="query 1: the words \\['w29'\\] carry no weight"):
        model.features("text", words=[["w5"], ["w29"]])
    with pytest.raises(QueryError, match="text modality only"):
        model.features("image", words=[["w1"]])
