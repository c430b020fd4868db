"""A photo model end to end outside the pipeline: trained on mirflickr25k's backbone features,
exported with the backbone inside one ONNX graph that takes uint8 pixels, checked on real photos,
and queried with real photos through ``lhash search`` and a real uvicorn (multipart and base64)."""

import base64
import json

import httpx
import numpy as np
import onnx
import pytest
import yaml

from lifelong_hashing.cli import main
from lifelong_hashing.config import load_params
from lifelong_hashing.engine.codestore import pack_codes
from lifelong_hashing.engine.runner import run_sequence
from lifelong_hashing.engine.state import load_state, save_state
from lifelong_hashing.inference.export import publish
from lifelong_hashing.inference.retrieval import QueryError, RetrievalModel
from lifelong_hashing.inference.versions import promote

from .conftest import ROOT, running_service
from .test_images import MIRFLICKR, photo_bytes

pytestmark = pytest.mark.integration

ROWS = list(range(0, 300, 20))  # photos shipped in data/mirflickr25k/photos


@pytest.fixture(scope="module")
def photo_model(tmp_path_factory):
    """Lifelong OrthoHash over two mirflickr25k stages, image side read by SqueezeNet, storing
    encoder codes (so a photo's code can be checked against its item's stored one)."""
    root = tmp_path_factory.mktemp("photos")
    params = load_params(ROOT / "params.yaml", {
        "dataset": "mirflickr25k", "model.image_backbone": "squeezenet1_1", "model.hidden": [128],
        "stages.base": 16, "stages.per_stage": 8, "train.epochs": 2, "train.lifelong_epochs": 1,
        "method.database_codes": "encoders", "export.int8_min_agreement": None, "serving.poll_seconds": 0.2})
    params = params.model_copy(update={"dataset": params.dataset.model_copy(
        update={"path": str(ROOT / params.dataset.path)})})
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump()))
    run_sequence(params, root / "run", quiet=True)
    state = load_state(root / "run" / "state")
    state.photos = tuple(photo_bytes(r) for r in ROWS[:8])
    save_state(state, root / "run" / "state")
    version = publish(load_state(root / "run" / "state"), root / "models", params.export)
    promote(root / "models", version.name)
    return {"root": root, "params": params, "state": state, "models": root / "models", "version": version}


def test_the_image_encoder_is_one_graph_from_pixels_to_code_with_parity_on_real_photos(photo_model):
    manifest = json.loads((photo_model["version"] / "manifest.json").read_text())
    image = manifest["encoders"]["image"]
    assert image["input"] == "pixels" and image["input_shape"] == [227, 227, 3]
    assert image["backbone"] == "squeezenet1_1" and image["parity"]["bit_agreement"] == 1.0
    assert image["parity"]["rows"] == 16  # the 8 kept photos and their mirror images
    graph = onnx.load(photo_model["version"] / image["file"]).graph
    (pixels,) = graph.input
    assert pixels.name == "pixels" and pixels.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert manifest["encoders"]["text"]["input"] == "features"


def test_a_photo_gets_the_code_of_its_shipped_features(photo_model):
    """The pixel path (decode → one ONNX graph) against the training path (mirflickr25k's shipped
    features → the PyTorch encoder): the same codes, but for the rare bit that the features'
    float16 storage moves across zero."""
    model = RetrievalModel(photo_model["version"])
    codes = model.encode("image", model.photos("image", [photo_bytes(r) for r in ROWS]))
    features = np.load(MIRFLICKR / "mirflickr25k.npz")["image_squeezenet"][ROWS].astype(np.float32)
    reference = pack_codes(photo_model["state"].method.continuous("image", features))
    differing = np.unpackbits((codes ^ reference).view(np.uint8)).sum()
    assert differing <= len(ROWS) // 4  # of len(ROWS) × 64 bits
    with pytest.raises(QueryError, match="takes photos, not feature vectors"):
        model.features("image", [[0.5] * 512])
    with pytest.raises(QueryError, match="photo 1: does not decode as JPEG"):
        model.photos("image", [photo_bytes(0), photo_bytes(0)[:500]])


def test_the_service_takes_photos_as_multipart_and_base64_and_refuses_bad_ones(photo_model):
    photo = photo_bytes(ROWS[1])
    with running_service(photo_model, photo_model["models"], "photos") as (url, _):
        multipart = httpx.post(url + "/search", data={"k": "5"}, files=[("image", ("a.jpg", photo, "image/jpeg"))])
        assert multipart.status_code == 200, multipart.text
        hits = multipart.json()["results"][0]["text"]
        assert len(hits) == 5
        encoded = base64.b64encode(photo).decode()
        as_json = httpx.post(url + "/search", json={"modality": "image", "k": 5, "images": [encoded]})
        assert as_json.json()["results"] == multipart.json()["results"]
        tag = photo_model["state"].store.categories[0]
        within = httpx.post(url + "/search", data={"k": "5", "filter": json.dumps({"any_of": [tag]})},
                            files=[("image", ("a.jpg", photo, "image/jpeg"))])
        assert within.status_code == 200 and all(tag in h["labels"] for h in within.json()["results"][0]["text"])
        data_url = httpx.post(url + "/encode", json={"modality": "image",
                                                    "images": ["data:image/jpeg;base64," + encoded]})
        two = httpx.post(url + "/encode", files=[("image", ("a.jpg", photo, "image/jpeg")),
                                                 ("image", ("b.jpg", photo_bytes(ROWS[2]), "image/jpeg"))])
        assert two.status_code == 200 and data_url.json()["codes"][0] == two.json()["codes"][0]
        refused = {
            "text/plain body": httpx.post(url + "/search", content=b"hello", headers={"content-type": "text/plain"}),
            "gif part": httpx.post(url + "/search", files=[("image", ("a.gif", b"GIF89a", "image/gif"))]),
            "mislabelled part": httpx.post(url + "/search", files=[("image", ("a.png", photo, "image/png"))]),
            "truncated": httpx.post(url + "/search", files=[("image", ("a.jpg", photo[:700], "image/jpeg"))]),
            "not base64": httpx.post(url + "/search", json={"modality": "image", "images": ["%%%"]}),
            "features": httpx.post(url + "/search", json={"modality": "image", "features": [[0.1] * 512]}),
            "text photo": httpx.post(url + "/search", json={"modality": "text", "images": [encoded]}),
            "filter not json": httpx.post(url + "/search", data={"filter": "{any_of"},
                                          files=[("image", ("a.jpg", photo, "image/jpeg"))]),
        }
        expected = {"text/plain body": (415, "Content-Type 'text/plain' is not taken"),
                    "gif part": (415, "part type 'image/gif'"),
                    "mislabelled part": (422, "declared image/png but the file is a JPEG"),
                    "truncated": (422, "photo 0: does not decode as JPEG"),
                    "not base64": (422, "images[0]: not base64"),
                    "features": (422, "takes photos, not feature vectors"),
                    "text photo": (422, "photos are queries of the image modality"),
                    "filter not json": (422, "form field 'filter': not JSON")}
        for case, (status, message) in expected.items():
            assert refused[case].status_code == status, (case, refused[case].text)
            assert message in refused[case].json()["detail"], (case, refused[case].text)
        spec = httpx.get(url + "/openapi.json").json()
        body = spec["paths"]["/search"]["post"]["requestBody"]["content"]

        def schema(kind: str) -> dict:  # request bodies are named components
            return spec["components"]["schemas"][body[kind]["schema"]["$ref"].rsplit("/", 1)[-1]]

        assert schema("multipart/form-data")["properties"]["image"]["items"]["format"] == "binary"
        assert "images" in schema("application/json")["properties"]
        cli_url = _cli(["search", "--url", url, "--image", str(MIRFLICKR / "photos" / "im21.jpg"), "--k", "3"])
    cli_models = _cli(["--params", str(photo_model["root"] / "params.yaml"), "search", "--models",
                       str(photo_model["models"]), "--image", str(MIRFLICKR / "photos" / "im21.jpg"), "--k", "3"])
    assert cli_url.count("distance") == 3 and cli_url == cli_models


def _cli(argv: list[str]) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()
