"""Modality encoders: features (or pixels) → K continuous code values; the code is their sign.

Every encoder ends in a Linear layer to K and a batch-norm without affine parameters: OrthoHash's
bit balancer, which centres each bit at zero so that the signs split the data evenly. Input
normalization (mean, std of the first training data) lives inside the module as buffers, so an
exported encoder takes raw features.
"""

from __future__ import annotations

import torch
from torch import nn


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when a GPU really works here, else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Encoder(nn.Module):
    """Normalize → body → Linear(K) → BatchNorm(K, affine=False)."""

    def __init__(self, body: nn.Module, body_dim: int, input_shape: tuple[int, ...], bits: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(input_shape))
        self.register_buffer("std", torch.ones(input_shape))
        self.body = body
        self.head = nn.Linear(body_dim, bits)
        self.balance = nn.BatchNorm1d(bits, affine=False)

    def set_normalization(self, x: torch.Tensor) -> None:
        """Fix input statistics from the first training data; later stages keep them.
        Features are normalized per dimension, pixels per channel."""
        if x.dim() == 4:
            flat = x.transpose(0, 1).reshape(x.shape[1], -1)
            self.mean.copy_(flat.mean(dim=1).view(-1, 1, 1))
            self.std.copy_(flat.std(dim=1).clamp_min(1e-6).view(-1, 1, 1))
        else:
            self.mean.copy_(x.mean(dim=0))
            self.std.copy_(x.std(dim=0).clamp_min(1e-6))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.balance(self.head(self.features(x)))


def mlp_body(in_dim: int, hidden: list[int], dropout: float) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = width
    return nn.Sequential(*layers), in_dim


def cnn_body(channels: int, hidden: list[int], dropout: float) -> tuple[nn.Module, int]:
    """A small CNN for pixel inputs (n, C, H, W) of any size: three conv blocks, global pooling."""
    convs: list[nn.Module] = []
    width = channels
    for out in (32, 64, 128):
        convs += [nn.Conv2d(width, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
        width = out
    head, dim = mlp_body(width, hidden, dropout)
    return nn.Sequential(*convs, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head), dim


def build_encoder(input_shape: tuple[int, ...], bits: int, hidden: list[int], dropout: float,
                  kind: str = "mlp") -> Encoder:
    if len(input_shape) == 3:
        if kind != "cnn":
            raise ValueError(f"pixel input of shape {input_shape} needs model.image_encoder: cnn")
        body, dim = cnn_body(input_shape[0], hidden, dropout)
        return Encoder(body, dim, (input_shape[0], 1, 1), bits)
    if len(input_shape) != 1:
        raise ValueError(f"unsupported input shape {input_shape}: expected (d,) or (C, H, W)")
    body, dim = mlp_body(input_shape[0], hidden, dropout)
    return Encoder(body, dim, input_shape, bits)

