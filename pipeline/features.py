"""Feature extractors for FID, KID and precision/recall: clean-fid's Inception-V3, or a small classifier trained here.

Both map uint8 images (N, H, W, 3) to float64 features (N, D) and, where they have them, logits (N, K).
- `inception`: the TorchScript port of TF Inception-V3 (inception-2015-12-05) through clean-fid's own `InceptionV3W`
  and resizer, in mode `clean` (PIL bicubic to 299 outside the net) or `legacy_tensorflow` (the TF-style bilinear
  resize inside the net, the protocol of the paper's ADM evaluator). Features: 2048-d pool3. Logits: the net's
  1008-way `output` layer without its bias, as the original Inception Score code computes them.
  With `extract(..., spatial=True)` it also gives sFID's spatial features: the first 7 channels of mixed_6/conv
  (`layers.mixed_6.conv` in the port), 17 x 17 x 7 flattened in TF's NHWC order as ADM's evaluator does. The port
  has no hook for them, so the input path (TF resize, normalization) is replayed and the layers run one by one;
  each batch checks that the replay's pool3 equals the net's own.
- `classifier`: a small CNN trained by the reference stage on the ingested images (the offline default, where
  Inception weights cannot be fetched). Features: its 128-d penultimate layer. Logits: its class head.

The reference stage records the extractor in `extractor.json`; `load_extractor` rebuilds exactly that one, so
evaluate always compares features of one network.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import stat
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from cleanfid.downloads_helper import inception_url
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import build_resizer
from torch import nn
from tqdm import tqdm

from pipeline.artifacts import ArtifactError, atomic_torch_save, atomic_write, atomic_write_json, sha256_file
from pipeline.params.load import ParamsError
from pipeline.provenance import NO_INPUT, local_input

EXTRACTOR_FILE = "extractor.json"
CLASSIFIER_FILE = "classifier.pt"
INCEPTION_FILE = "inception-2015-12-05.pt"  # InceptionV3W loads this exact name from the directory it is given
INCEPTION_URL = inception_url
INCEPTION_DIM = 2048
INCEPTION_SIZE = 299  # the net's input resolution
# sFID (Nash et al. 2021, as ADM's evaluator computes it): the first 7 of the 192 channels of mixed_6/conv, whose
# 17 x 17 x 7 = 2023 values are about as many as pool3's 2048. In the TorchScript port the layer is
# `layers.mixed_6.conv`.
SFID_BLOCK, SFID_LAYER, SFID_CHANNELS = "mixed_6", "conv", 7
REPLAY_TOLERANCE = 1e-3  # rtol = atol between pool3 of the replayed input path and of the net's own forward
DOWNLOAD_TIMEOUT_S = 30  # fail fast on an offline machine instead of hanging in a socket read
# The classifier extractor's architecture: a fixed design, recorded in extractor.json with the weights.
CLASSIFIER_CHANNELS = (32, 64, 128, 256)
CLASSIFIER_FEATURE_DIM = 128


class WeightsUnavailable(RuntimeError):
    """The Inception weights are neither on disk nor downloadable."""


class SpatialReplayMismatch(RuntimeError):
    """The replayed Inception input path does not reproduce the net's own features: its taps are not sFID's."""


@dataclass(frozen=True)
class Extracted:
    features: np.ndarray  # (N, D) float64
    logits: np.ndarray | None  # (N, K) float32, or None for an extractor without a class head
    spatial: np.ndarray | None = None  # (N, S) float64, sFID's features, when asked for


class Extractor:
    """Batched extraction shared by both extractors; subclasses implement `_batch` and `config`."""

    name: str
    mode: str | None
    feature_dim: int
    device: torch.device

    def _batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, H, W) float in [0, 255] on `device` -> features (B, D), logits (B, K) or None."""
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError

    def spatial_unavailable(self) -> str | None:
        """Why this extractor cannot give sFID's spatial features, or None when it can."""
        return f"sFID is defined on Inception-V3's mixed_6/conv features; the {self.name} extractor has none"

    def _batch_spatial(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def extract(
        self, images: np.ndarray, batch_size: int, pbar: tqdm | None = None, spatial: bool = False
    ) -> Extracted:
        """uint8 (N, H, W, 3) -> features and logits (and sFID's spatial features with `spatial`, which
        `spatial_unavailable` must allow); `pbar` lets a caller show one bar over several calls."""
        _check_images(images)
        if spatial and self.spatial_unavailable():
            raise ValueError(self.spatial_unavailable())
        bar = pbar if pbar is not None else tqdm(total=len(images), desc=f"{self.name} features", unit="img")
        features, logits, spatials = [], [], []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            x = self._to_tensor(batch)
            f, l, *s = self._batch_spatial(x) if spatial else self._batch(x)  # noqa: E741 (features, logits, spatial taps)
            features.append(f.double().cpu().numpy())
            logits.append(None if l is None else l.float().cpu().numpy())
            spatials += [s[0].double().cpu().numpy()] if spatial else []
            bar.update(len(batch))
        if pbar is None:
            bar.close()
        has_logits = bool(logits) and logits[0] is not None
        return Extracted(
            features=np.concatenate(features) if features else np.zeros((0, self.feature_dim)),
            logits=np.concatenate(logits) if has_logits else None,
            spatial=np.concatenate(spatials) if spatials else None,
        )

    def features(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        return self.extract(images, batch_size).features

    def logits(self, images: np.ndarray, batch_size: int) -> np.ndarray | None:
        return self.extract(images, batch_size).logits

    def _to_tensor(self, batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(batch)).to(self.device).permute(0, 3, 1, 2).float()


def _check_images(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")


def select_device(use_gpu: bool, section: str) -> torch.device:
    if use_gpu and not torch.cuda.is_available():
        raise ParamsError(f"{section}.use_gpu is true but torch sees no CUDA device; set it to false to use the CPU")
    return torch.device("cuda" if use_gpu else "cpu")


# ---------------------------------------------------------------------------------------------------------------------
# The classifier extractor


class ClassifierNet(nn.Module):
    """A small CNN: 3x3 convs with stride 2 (each halves the resolution; full-resolution convs cost 10x the CPU time
    for little accuracy on 32-px images), GroupNorm, global average pool, a feature layer, a class head.

    `forward` follows clean-fid's `custom_feat_extractor` convention, so the net plugs into `cleanfid.fid`:
    x (B, 3, H, W) float in [0, 255] -> features (B, feature_dim). `classify` gives the logits (B, num_classes).
    """

    def __init__(self, num_classes: int, image_size: int, channels: tuple[int, ...], feature_dim: int):
        super().__init__()
        self.image_size = image_size
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.feature = nn.Sequential(nn.Linear(c_in, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):  # e.g. clean-fid's default 299 resize
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        h = self.body(x / 127.5 - 1.0)  # (B, C, h, w)
        return self.feature(h.mean(dim=(2, 3)))  # (B, feature_dim)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self(x))


def classifier_arch(num_classes: int, image_size: int) -> dict:
    """The constructor kwargs of the classifier for a dataset: what extractor.json records."""
    return dict(
        num_classes=num_classes,
        image_size=image_size,
        channels=list(CLASSIFIER_CHANNELS),
        feature_dim=CLASSIFIER_FEATURE_DIM,
    )


def build_classifier(arch: dict) -> ClassifierNet:
    return ClassifierNet(arch["num_classes"], arch["image_size"], tuple(arch["channels"]), arch["feature_dim"])


class ClassifierExtractor(Extractor):
    name = "classifier"
    mode = None

    def __init__(self, net: ClassifierNet, arch: dict, device: torch.device):
        self.net = net.to(device).eval()
        self.arch = arch
        self.device = device
        self.feature_dim = arch["feature_dim"]

    def _batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.net(x)
        return f, self.net.head(f)

    def config(self) -> dict:
        return {
            "extractor": self.name,
            "mode": None,
            "feature_dim": self.feature_dim,
            "arch": self.arch,
            "weights": CLASSIFIER_FILE,
        }


# ---------------------------------------------------------------------------------------------------------------------
# The Inception extractor


def cleanfid_weights_path() -> Path:
    """Where clean-fid itself looks for (and downloads) the weights; it hard-codes this directory."""
    return Path("./" if platform.system() == "Windows" else "/tmp") / INCEPTION_FILE


def resolve_inception_weights(path: str | None) -> Path:
    """The weights file to load: `path` (params `reference.inception_weights`), else (None or provenance.NO_INPUT)
    clean-fid's usual location, downloading it there with a timeout. Raises `WeightsUnavailable` saying where to put
    the file."""
    path = local_input(path)
    if path is not None:
        file = Path(path)
        file = file / INCEPTION_FILE if file.is_dir() else file
        if not file.is_file():
            raise WeightsUnavailable(
                f"reference.inception_weights = {path!r}: no such file. Download {INCEPTION_URL} to that path, "
                f"and `dvc add` it, or set reference.inception_weights: {NO_INPUT} to use clean-fid's location "
                f"{cleanfid_weights_path()}"
            )
        if file.name != INCEPTION_FILE:
            raise WeightsUnavailable(
                f"reference.inception_weights = {path!r}: clean-fid's InceptionV3W loads the file by its name; "
                f"rename it to {INCEPTION_FILE} (or point the param at its directory)"
            )
        return file
    file = cleanfid_weights_path()
    if not file.is_file():
        download_inception(file)
    return file


def download_inception(dest: Path) -> None:
    """clean-fid's download (same URL, same place), but atomic and with a timeout, so that an offline machine gets
    an error instead of a hang and an interrupted download leaves no truncated file for the next run to load."""
    tqdm.write(f"downloading the Inception weights {INCEPTION_URL} -> {dest}")
    try:
        with urllib.request.urlopen(INCEPTION_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
            atomic_write(dest, lambda tmp: tmp.write_bytes(response.read()))
    except (urllib.error.URLError, TimeoutError) as e:
        raise WeightsUnavailable(
            f"the Inception weights are not available: {dest} does not exist and downloading {INCEPTION_URL} "
            f"failed ({e}). On an offline machine, fetch that file elsewhere and copy it to {dest}, or set "
            f"`reference.inception_weights: inputs/{INCEPTION_FILE}` in params.yaml (after `dvc add` of it) "
            f"(or use `reference.extractor: classifier`)"
        ) from e


def read_weights(path: Path) -> bytes:
    """The bytes of the Inception weights file at `path`, read once, so that the hash recorded and the net loaded
    are of the same bytes (a second read of a shared path could find another file).

    No sha256 of clean-fid's file is pinned: none was found published by clean-fid or NVIDIA, and a hash taken
    from an unchecked copy would pin nothing. Instead a file in a folder that others may write to (clean-fid's
    /tmp location) must be a regular file owned by this user or root and writable by no one else, checked on the
    open file: another user could otherwise have put their own TorchScript program there first, and
    `torch.jit.load` runs it. The recorded hash (`extractor.json`) then holds evaluate to the same bytes."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise WeightsUnavailable(f"{path}: cannot be read ({e.strerror})") from e
    with os.fdopen(fd, "rb") as f:
        info, folder = os.fstat(f.fileno()), os.stat(Path(path).parent)
        shared_folder = folder.st_mode & 0o022 or folder.st_uid not in (0, os.getuid())
        others = info.st_uid not in (0, os.getuid()) or info.st_mode & 0o022 or not stat.S_ISREG(info.st_mode)
        if shared_folder and others:
            raise WeightsUnavailable(
                f"{path} is in a folder other users can write to, and is owned by uid {info.st_uid} with mode "
                f"{stat.filemode(info.st_mode)}: it may not be clean-fid's file. Delete it and download "
                f"{INCEPTION_URL} yourself, or set reference.inception_weights to a copy only you can write "
                f"(`dvc add` it)"
            )
        return f.read()


class _InceptionFromBytes(InceptionV3W):
    """clean-fid's InceptionV3W (its forward), built from bytes already read: its own __init__ loads by path."""

    def __init__(self, weights: bytes, resize_inside: bool):
        nn.Module.__init__(self)
        self.base = torch.jit.load(io.BytesIO(weights), map_location="cpu").eval()
        self.layers = self.base.layers
        self.resize_inside = resize_inside


class InceptionExtractor(Extractor):
    name = "inception"
    feature_dim = INCEPTION_DIM

    def __init__(self, weights: Path, mode: str, device: torch.device):
        if mode not in ("clean", "legacy_tensorflow"):
            raise ValueError(f"inception mode must be 'clean' or 'legacy_tensorflow', got {mode!r}")
        self.mode = mode
        self.weights = Path(weights)
        self.device = device
        data = read_weights(self.weights)
        self.weights_sha256 = hashlib.sha256(data).hexdigest()  # of the bytes loaded below, not of a later read
        # clean: clean-fid resizes outside the net (PIL bicubic, float); legacy_tensorflow: the net resizes inside.
        self.model = _InceptionFromBytes(data, resize_inside=mode == "legacy_tensorflow").to(device).eval()
        self.resize = build_resizer(mode)
        # IS logits use the output layer without its bias, as the original (improved-gan) implementation does.
        self.output_weight = self.model.base.output.weight.detach().to(device)  # (1008, 2048)

    def _to_tensor(self, batch: np.ndarray) -> torch.Tensor:
        resized = np.stack([self.resize(img) for img in batch]).astype(np.float32)  # (B, 299, 299, 3) or as is
        return torch.from_numpy(resized).to(self.device).permute(0, 3, 1, 2)

    def _batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.model(x)  # (B, 2048)
        return f, F.linear(f, self.output_weight)

    def config(self) -> dict:
        return {
            "extractor": self.name,
            "mode": self.mode,
            "feature_dim": self.feature_dim,
            "weights_sha256": self.weights_sha256,
        }

    def spatial_unavailable(self) -> str | None:
        block = dict(self.model.layers.named_children()).get(SFID_BLOCK)
        if block is None or SFID_LAYER not in dict(block.named_children()):
            return (
                f"{self.weights} has no layers.{SFID_BLOCK}.{SFID_LAYER}, the TorchScript Inception's "
                f"mixed_6/conv whose spatial features sFID compares"
            )
        return None

    def _net_input(self, x: torch.Tensor) -> torch.Tensor:
        """What `layers` receives from InceptionV3W (clean: x is resized already) or from the TorchScript forward
        (legacy_tensorflow: TF's resize inside the net), for x (B, 3, H, W) float in [0, 255]."""
        if self.mode == "legacy_tensorflow":
            x = tf_legacy_resize(x, INCEPTION_SIZE)
        return (x - 128) / 128

    def _batch_spatial(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features and logits as `_batch`, and sFID's features (B, 2023): the layers run one by one on the
        replayed input path, tapping mixed_6/conv; the replay's pool3 must equal the net's own, else the taps would
        not be the net's features and this raises."""
        f, logits = self._batch(x)
        h, tap = self._net_input(x), None
        for name, layer in self.model.layers.named_children():
            if name == SFID_BLOCK:
                tap = getattr(layer, SFID_LAYER)(h)  # (B, 192, 17, 17) in the real net
            h = layer(h)
        replayed = h.reshape(f.shape)
        if not torch.allclose(replayed, f, rtol=REPLAY_TOLERANCE, atol=REPLAY_TOLERANCE):
            raise SpatialReplayMismatch(
                f"the replayed input path of {self.weights.name} in mode {self.mode} gives pool3 features "
                f"{float((replayed - f).abs().max()):.3g} away from the net's own; its mixed_6/conv taps would not "
                f"be the net's features"
            )
        # ADM flattens TF's NHWC tensor: channel fastest, then width, then height; the stored sigma_s is in that order.
        return f, logits, tap[:, :SFID_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), -1)


def tf_legacy_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size) by TF1's resize_bilinear(align_corners=False), the resize inside ADM's
    evaluator graph: output pixel i reads the input at i * H / size (no half-pixel offset), neighbours clamped at
    the border. grid_sample(align_corners=False) reads normalized u at pixel (u + 1) * H / 2 - 0.5, so
    u = (2 * src + 1) / H - 1 puts the read at src."""
    b, _, h, w = x.shape
    src_y = torch.arange(size, device=x.device, dtype=x.dtype) * (h / size)
    src_x = torch.arange(size, device=x.device, dtype=x.dtype) * (w / size)
    gy, gx = torch.meshgrid((2 * src_y + 1) / h - 1, (2 * src_x + 1) / w - 1, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).expand(b, size, size, 2)  # grid_sample takes (x, y)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------------------------------------------
# Saving and rebuilding


def save_extractor(directory: str | Path, extractor: Extractor, inception_weights: str | None) -> dict:
    """Write extractor.json (+ classifier.pt); `inception_weights` is the params value, kept for `load_extractor`."""
    directory = Path(directory)
    config = extractor.config()
    if isinstance(extractor, ClassifierExtractor):
        state = {k: v.detach().cpu() for k, v in extractor.net.state_dict().items()}
        atomic_torch_save(directory / CLASSIFIER_FILE, state)
        config["weights_sha256"] = sha256_file(directory / CLASSIFIER_FILE)
    else:
        config["weights_param"] = inception_weights
    atomic_write_json(directory / EXTRACTOR_FILE, config)
    return config


def load_extractor(directory: str | Path, device: torch.device, inception_weights: str | None = None) -> Extractor:
    """Rebuild the extractor the reference stage recorded in `directory`. For Inception, `inception_weights`
    overrides the recorded path (another machine); the file's hash must match the recorded one either way."""
    directory = Path(directory)
    path = directory / EXTRACTOR_FILE
    if not path.exists():
        raise ArtifactError(f"{path} is missing; run `dvc repro reference`")
    config = json.loads(path.read_text())
    if config["extractor"] == "classifier":
        weights = directory / config["weights"]
        _check_hash(weights, config["weights_sha256"], "run `dvc repro reference`")
        net = build_classifier(config["arch"])
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return ClassifierExtractor(net, config["arch"], device)
    if config["extractor"] == "inception":
        extractor = InceptionExtractor(
            resolve_inception_weights(inception_weights or config["weights_param"]), config["mode"], device
        )
        if extractor.weights_sha256 != config["weights_sha256"]:
            raise ArtifactError(
                f"{extractor.weights} has sha256 {extractor.weights_sha256[:12]}…, the reference "
                f"used {config['weights_sha256'][:12]}…; use the file the reference stage used, or "
                "rerun it"
            )
        return extractor
    raise ArtifactError(f"{path}: unknown extractor {config['extractor']!r}; run `dvc repro reference`")


def _check_hash(path: Path, expected: str, fix: str) -> None:
    if not path.exists():
        raise ArtifactError(f"{path} is missing; {fix}")
    actual = sha256_file(path)
    if actual != expected:
        raise ArtifactError(f"{path} has sha256 {actual[:12]}…, the reference used {expected[:12]}…; {fix}")
