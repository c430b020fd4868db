"""Photos in: decoding with hard limits, the one preparation every photo gets, and the batch
columns that carry them.

A photo is checked before it costs anything: its encoded size, its magic bytes (JPEG or PNG
only) and the pixel count its header declares, read without decoding; only then is it decoded
(JPEGs at the smallest scale that still covers ``size``), so a decompression bomb or a huge
declared image is refused from its header and a truncated file from its decoder, never loaded
whole. Preparation is fixed: EXIF orientation applied, RGB, the central square, a bicubic
resize to the backbone's input (``size`` × ``size``, 227 for SqueezeNet): the preparation that
made mirflickr25k's features, and the one function training, the pipeline and the service call,
so that they make the same pixels of the same photo.

In a batch file, photos are either encoded files, concatenated in ``image_files`` (uint8) with
``image_file_offsets`` (int64, n + 1 ascending, from 0 to its length: row i is
``image_files[offsets[i]:offsets[i + 1]]``), or decoded pixels in ``image`` (uint8, n × size ×
size × 3, RGB). docs/data.md, "Photos".
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

from lifelong_hashing.config import Params, PhotoLimitsConfig
from lifelong_hashing.engine.batch import PHOTO_FIELDS, BatchError, read_npz, shown
from lifelong_hashing.files import write_npz

FORMATS = {"JPEG": b"\xff\xd8\xff", "PNG": b"\x89PNG\r\n\x1a\n"}
FILES_KEY, OFFSETS_KEY = PHOTO_FIELDS
PHOTO_SAMPLE = 16  # encoded photos a state keeps for the export's parity check on real pictures


class PhotoError(ValueError):
    """A photo that is not a JPEG or PNG, is over a limit, or does not decode."""


def photo_format(data: bytes) -> str:
    """The format the magic bytes say, or PhotoError naming what the file starts with."""
    for name, magic in FORMATS.items():
        if data.startswith(magic):
            return name
    raise PhotoError(f"not a JPEG or PNG (starts with {data[:8].hex(' ') or 'nothing'})")


def decode_photo(data: bytes, size: int, limits: PhotoLimitsConfig) -> np.ndarray:
    """One encoded photo → uint8 (size, size, 3) RGB, or PhotoError saying why not."""
    from PIL import Image, ImageOps

    if len(data) > limits.max_file_bytes:
        raise PhotoError(f"{len(data):,} bytes, over the limit of {limits.max_file_bytes:,}")
    kind = photo_format(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[kind])
            width, height = image.size
            if max(width, height) > limits.max_side or width * height > limits.max_pixels:
                raise PhotoError(f"declares {width:,} × {height:,} pixels, over the limits of "
                                 f"{limits.max_pixels:,} pixels and {limits.max_side:,} a side")
            if kind == "JPEG":
                image.draft("RGB", (size, size))  # decode at 1/2, 1/4 or 1/8 when that still covers size
            image.load()
            image = ImageOps.exif_transpose(image).convert("RGB")
    except PhotoError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise PhotoError(f"does not decode as {kind}: {shown(err, 120, quoted=False)}") from err
    return prepare_photo(image, size)


def prepare_photo(image, size: int) -> np.ndarray:
    """The central square of an RGB PIL image, resized (bicubic, antialiased when shrinking) to
    size × size."""
    from PIL import Image

    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.uint8)


def split_files(blob: np.ndarray, offsets: np.ndarray, rows: int, source: str) -> list[bytes]:
    """The ``image_files`` column cut into one encoded file per row, after checking its offsets."""
    if blob.ndim != 1 or blob.dtype != np.uint8:
        raise BatchError(source, FILES_KEY, f"expected 1-D uint8 bytes, got {blob.shape} {blob.dtype}")
    if offsets.shape != (rows + 1,) or offsets.dtype.kind not in "iu":
        raise BatchError(source, OFFSETS_KEY, f"expected {rows + 1} integer offsets (one more than the "
                                              f"{rows} ids), got {offsets.shape} {offsets.dtype}")
    offsets = offsets.astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != len(blob) or (np.diff(offsets) <= 0).any():
        raise BatchError(source, OFFSETS_KEY, f"must rise strictly from 0 to {len(blob):,} (the length of "
                                              f"{FILES_KEY}); no row may be empty")
    data = blob.tobytes()
    return [data[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def check_pixels(pixels: np.ndarray, size: int, source: str) -> np.ndarray:
    """Decoded pixels in a batch: uint8 (n, size, size, 3)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3):
        raise BatchError(source, "image", f"photos as pixels must be uint8 (n, {size}, {size}, 3) RGB "
                                          f"(the backbone's input), got {pixels.shape} {pixels.dtype}")
    return pixels


def pack_files(files: list[bytes] | tuple[bytes, ...]) -> dict[str, np.ndarray]:
    """Encoded files as the two batch columns (what a sender writes)."""
    offsets = np.zeros(len(files) + 1, np.int64)
    offsets[1:] = np.cumsum([len(f) for f in files])
    return {FILES_KEY: np.frombuffer(b"".join(files), np.uint8), OFFSETS_KEY: offsets}


def save_photos(path: Path, files: tuple[bytes, ...], ids: tuple[str, ...]) -> Path:
    return write_npz(path, {**pack_files(files), "ids": np.asarray(ids, dtype=str)})


def load_photos(path: Path) -> tuple[tuple[bytes, ...], tuple[str, ...]]:
    """The encoded photos ``save_photos`` wrote and their items' ids (none for a file written
    before photos carried them); none when there is no such file."""
    if not path.exists():
        return (), ()
    arrays = read_npz(path, list(PHOTO_FIELDS), ("ids",))
    files = tuple(split_files(arrays[FILES_KEY], arrays[OFFSETS_KEY], len(arrays[OFFSETS_KEY]) - 1, str(path)))
    return files, tuple(arrays.get("ids", np.empty(0, str)).tolist())


def photo_column(arrays: dict[str, np.ndarray], source: str) -> list[bytes] | np.ndarray | None:
    """A batch file's photos: its encoded files, its uint8 (n, h, w, 3) pixels, or None for image
    features."""
    rows = len(arrays["ids"])
    if FILES_KEY in arrays or OFFSETS_KEY in arrays:
        if FILES_KEY not in arrays or OFFSETS_KEY not in arrays:
            raise BatchError(source, FILES_KEY, f"{FILES_KEY} and {OFFSETS_KEY} come together")
        if "image" in arrays:
            raise BatchError(source, "image", f"a batch carries image features or {FILES_KEY}, not both")
        return split_files(arrays[FILES_KEY], arrays[OFFSETS_KEY], rows, source)
    image = arrays.get("image")
    return image if image is not None and image.dtype == np.uint8 and image.ndim == 4 else None


def sample_files(photos: list[bytes] | np.ndarray) -> tuple[bytes, ...]:
    """The first few photos as encoded files (pixels as lossless PNG, which decode to themselves)."""
    if isinstance(photos, list):
        return tuple(photos[:PHOTO_SAMPLE])
    from PIL import Image

    out = []
    for pixels in photos[:PHOTO_SAMPLE]:
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return tuple(out)


class PhotoReader:
    """A batch's photos → the backbone's features, ``rows`` photos decoded at a time, so that a
    large batch never holds more than that many decoded images. A photo that fails keeps a zero
    feature row and its reason; the caller decides what a failure means (validation reports each,
    loading refuses the batch)."""

    def __init__(self, backbone: str, limits: PhotoLimitsConfig, rows: int = 64):
        from lifelong_hashing.engine.backbone import BACKBONES

        self.spec, self.limits, self.rows = BACKBONES[backbone], limits, rows

    @staticmethod
    def from_params(params: Params) -> PhotoReader | None:
        """The reader a model's batches need: None for a model that takes image features."""
        backbone = params.model.image_backbone
        return None if backbone == "none" else PhotoReader(backbone, params.photos)

    @property
    def size(self) -> int:
        return self.spec.input_size

    def features(self, photos: list[bytes] | np.ndarray) -> tuple[np.ndarray, list[str | None]]:
        from lifelong_hashing.engine.backbone import photo_features, shared_backbone

        backbone = shared_backbone(self.spec.name)
        out = np.zeros((len(photos), self.spec.dim), np.float32)
        problems: list[str | None] = [None] * len(photos)
        for start in range(0, len(photos), self.rows):
            chunk = photos[start:start + self.rows]
            if isinstance(photos, list):
                pixels = np.zeros((len(chunk), self.size, self.size, 3), np.uint8)
                for i, data in enumerate(chunk):
                    try:
                        pixels[i] = decode_photo(data, self.size, self.limits)
                    except PhotoError as err:
                        problems[start + i] = str(err)
            else:
                pixels = chunk
            out[start:start + len(chunk)] = photo_features(backbone, pixels)
        for i, problem in enumerate(problems):
            if problem:
                out[i] = 0.0
        return out, problems

    def batch_arrays(self, arrays: dict[str, np.ndarray], source: str
                     ) -> tuple[dict[str, np.ndarray], list[str | None], tuple[bytes, ...]]:
        """``arrays`` with the photos replaced by their features in ``image``, each row's decoding
        problem (None when it decoded), and the sample of encoded photos; features pass as they are."""
        photos = photo_column(arrays, source)
        if photos is None:
            return arrays, [None] * len(arrays["ids"]), ()
        if isinstance(photos, np.ndarray):
            check_pixels(photos, self.size, source)
        features, problems = self.features(photos)
        kept = {k: v for k, v in arrays.items() if k not in (FILES_KEY, OFFSETS_KEY)}
        return {**kept, "image": features}, problems, sample_files(photos)


def read_batch_photos(arrays: dict[str, np.ndarray], reader: PhotoReader | None, source: str
                      ) -> tuple[dict[str, np.ndarray], tuple[bytes, ...]]:
    """A loaded batch file's arrays with photos as features, or BatchError: photos sent to a model
    without a backbone, or a photo that does not decode (the first is named)."""
    if reader is None:  # uint8 pixels are then the input of a CNN trained from scratch (model.image_encoder)
        if FILES_KEY in arrays or OFFSETS_KEY in arrays:  # refused as they are: nothing is cut apart
            raise BatchError(source, FILES_KEY, "the batch carries photo files but the model takes image "
                                                "features (model.image_backbone: none)")
        return arrays, ()
    converted, problems, sample = reader.batch_arrays(arrays, source)
    for i, problem in enumerate(problems):
        if problem:
            raise BatchError(source, FILES_KEY, f"item {shown(arrays['ids'][i])} (row {i}): {problem}")
    return converted, sample
