"""Test data: a small structured image set (coloured shapes), a `dit-images` v1 directory holding it, and a tiny
TorchScript stand-in for clean-fid's Inception weights file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline.artifacts import sha256_file, write_manifest

PALETTE = np.array([(230, 50, 50), (50, 200, 60), (60, 90, 230), (230, 200, 40), (200, 60, 200)], np.float64)
SHAPES = ("square", "disk", "hbar", "vbar")


def make_shapes(n: int, num_classes: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, size, size, 3), labels (n,): class c is shape c % 4 in colour c % 5 (unique for c < 20),
    at a random place and scale on a random grey background with pixel noise."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    yy, xx = np.mgrid[:size, :size] + 0.5
    images = np.empty((n, size, size, 3), np.uint8)
    for i, c in enumerate(labels):
        cx, cy = rng.uniform(0.3, 0.7, 2) * size
        r = rng.uniform(0.15, 0.3) * size
        dx, dy = np.abs(xx - cx), np.abs(yy - cy)
        mask = {
            "square": (dx < r) & (dy < r),
            "disk": dx**2 + dy**2 < r**2,
            "hbar": (dx < 1.6 * r) & (dy < 0.5 * r),
            "vbar": (dx < 0.5 * r) & (dy < 1.6 * r),
        }[SHAPES[c % 4]]
        img = np.full((size, size, 3), rng.uniform(0, 90))
        img[mask] = PALETTE[c % 5] * rng.uniform(0.8, 1.1)
        images[i] = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    return images, labels


def blob_images(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, size, size, 3) smooth colour blobs on a flat background (class = number of blobs - 1), labels (n,)."""
    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[:size, :size] + 0.5) / size
    labels = np.arange(n, dtype=np.int64) % 3
    images = np.empty((n, size, size, 3), np.uint8)
    for i, label in enumerate(labels):
        img = np.ones((size, size, 3)) * rng.uniform(0, 1, 3)
        for _ in range(label + 1):
            cy, cx = rng.uniform(0.2, 0.8, 2)
            weight = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(0.1, 0.25) ** 2))[..., None]
            img = img * (1 - weight) + weight * rng.uniform(0, 1, 3)
        images[i] = np.round(img * 255)
    return images, labels


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_images_dir(
    directory: Path, images: np.ndarray, labels: np.ndarray, num_classes: int, shard_size: int
) -> Path:
    """A `dit-images` v1 directory as the ingest stage writes it."""
    directory.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, start in enumerate(range(0, len(images), shard_size)):
        rows = range(start, min(start + shard_size, len(images)))
        table = pa.table(
            {
                "image": pa.array([png_bytes(images[i]) for i in rows], pa.binary()),
                "label": pa.array(labels[list(rows)], pa.int64()),
                "key": pa.array([f"synthetic/{i:06d}" for i in rows], pa.string()),
            }
        )
        path = directory / f"shard-{s:05d}.parquet"
        pq.write_table(table, path)
        shards.append({"file": path.name, "count": len(rows), "sha256": sha256_file(path)})
    write_manifest(
        directory,
        "dit-images",
        1,
        count=len(images),
        image_size=images.shape[1],
        num_classes=num_classes,
        class_names=[f"class{c}" for c in range(num_classes)],
        source={"kind": "synthetic"},
        shards=shards,
        skipped={"count": 0, "by_reason": {}},
    )
    return directory


class _TinyLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3)), x.amin(dim=(2, 3)), x.std(dim=(2, 3))], 1)
        return torch.relu(self.proj(pooled))[:, :, None, None]  # (B, 2048, 1, 1) like pool3


class _TinyInception(nn.Module):
    """Same call interface as inception-2015-12-05.pt: forward(img, return_features, use_fp16, no_output_bias)
    with the TF-style resize inside, `layers` on normalized 299-px input, and a 1008-way `output` layer."""

    def __init__(self):
        super().__init__()
        self.layers = _TinyLayers()
        self.output = nn.Linear(2048, 1008)

    def forward(
        self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False
    ) -> torch.Tensor:
        x = F.interpolate(img.to(torch.float32), size=(299, 299), mode="bilinear", align_corners=False)
        feats = self.layers((x - 128.0) / 128.0).reshape(-1, 2048)
        if return_features:
            return feats
        logits = F.linear(feats, self.output.weight) if no_output_bias else self.output(feats)
        return F.softmax(logits, 1)


def save_tiny_inception(path: Path, seed: int) -> Path:
    """Script and save the stand-in where a real inception-2015-12-05.pt would go."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(_TinyInception()).save(str(path))
    return path


class _Unit(nn.Module):
    """A conv + ReLU, standing in for the port's conv/BN/ReLU units."""

    def __init__(self, c_in: int, c_out: int, k: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, padding=k // 2)
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")  # keeps the image's signal through depth
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class _Mixed(nn.Module):
    """An inception block: branches `conv` and `tower` on one input, concatenated along channels."""

    def __init__(self, c_in: int, c_conv: int, c_tower: int):
        super().__init__()
        self.conv = _Unit(c_in, c_conv)
        self.tower = _Unit(c_in, c_tower, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x)], 1)


class _InceptionLike(nn.Module):
    """A small net with the TorchScript Inception's names and interface: `layers` holds conv, conv_1, conv_2, pool0,
    conv_3, conv_4, pool1, mixed, mixed_1 ... mixed_10, pool2 in order, the 17 x 17 grid from pool1 to mixed_7
    (mixed_6 has a `conv` branch of 12 channels), pool3 of 2048 from the whole grid; `forward` resizes to 299
    inside, as TF1's resize_bilinear (written here as an affine grid: x_src = x_dst * W / 299) or, with
    `half_pixel`, with F.interpolate's half-pixel centres (a wrong replay target), then normalizes (x - 128) / 128."""

    def __init__(self, half_pixel: bool):
        super().__init__()
        from collections import OrderedDict

        units = [
            ("conv", _Unit(3, 8)),
            ("conv_1", _Unit(8, 8)),
            ("conv_2", _Unit(8, 8)),
            ("pool0", nn.AvgPool2d(4)),
            ("conv_3", _Unit(8, 16, 3)),
            ("conv_4", _Unit(16, 16)),
            ("pool1", nn.AdaptiveAvgPool2d(17)),
        ]
        units += [("mixed" + ("" if i == 0 else f"_{i}"), _Mixed(16, 8, 8)) for i in range(6)]
        units += [("mixed_6", _Mixed(16, 12, 4)), ("mixed_7", _Mixed(16, 8, 8)), ("pool_7", nn.AvgPool2d(2))]
        # mixed_10 sees the whole 8 x 8 grid at once, so that pool3, like the real one, depends on where things are
        units += [(f"mixed_{i}", _Mixed(16, 8, 8)) for i in (8, 9)] + [("mixed_10", nn.Conv2d(16, 2048, 8))]
        units += [("pool2", nn.AdaptiveAvgPool2d(1))]
        self.layers = nn.Sequential(OrderedDict(units))
        self.output = nn.Linear(2048, 1008)
        self.half_pixel = half_pixel

    def forward(
        self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False
    ) -> torch.Tensor:
        x = img.to(torch.float32)
        b, c, h, w = x.shape
        if self.half_pixel:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        else:
            theta = (
                torch.tensor([[1.0, 0.0, 1.0 / w - 1.0 / 299], [0.0, 1.0, 1.0 / h - 1.0 / 299]], device=x.device)
                .unsqueeze(0)
                .repeat(b, 1, 1)
            )
            grid = F.affine_grid(theta, [b, c, 299, 299], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        feats = self.layers((x - 128.0) / 128.0).reshape(-1, 2048)
        if return_features:
            return feats
        logits = F.linear(feats, self.output.weight) if no_output_bias else self.output(feats)
        return F.softmax(logits, 1)


def save_inception_like(path: Path, seed: int, half_pixel: bool = False) -> Path:
    """Script and save a net with the real port's layer names where inception-2015-12-05.pt would go."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(_InceptionLike(half_pixel)).save(str(path))
    return path
