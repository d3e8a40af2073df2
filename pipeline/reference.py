"""The `reference` stage: feature statistics of the real images, the other half of every FID.

Reads `data/images/` (dit-images v1), builds the configured extractor (for `classifier`, trains it here on CPU with
a fixed seed and data order, holding out `holdout` images to measure its accuracy), extracts features of all real
images and writes `data/reference/` (dit-reference v1): `stats.npz` with `mu`, `sigma` (float64) over all images for
FID, and the `features` (M, D) float32 with their `labels` for KID and precision/recall (all N images, or a seeded
subset of `max_features`, as ADM's reference batches keep 10,000), plus `extractor.json` (+ `classifier.pt`).
"""
from __future__ import annotations

import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import data
from pipeline.artifacts import ArtifactError, atomic_write, sha256_file, write_manifest
from pipeline.features import (ClassifierExtractor, Extractor, InceptionExtractor, build_classifier,
                               classifier_arch, resolve_inception_weights, save_extractor,
                               select_device)

REFERENCE_FORMAT, REFERENCE_VERSION = "dit-reference", 1
STATS_FILE = "stats.npz"


@dataclass(frozen=True)
class ReferenceParams:
    extractor: Literal["classifier", "inception"]
    mode: Literal["clean", "legacy_tensorflow"]  # inception only
    inception_weights: str | None
    classifier_steps: int
    classifier_batch_size: int
    classifier_lr: float
    holdout: int
    max_features: int | None  # real features stored for KID and precision/recall; None = all
    batch_size: int  # feature extraction batch
    use_gpu: bool  # feature extraction device; the classifier always trains on CPU
    seed: int


# ---------------------------------------------------------------------------------------------------------------------
# The classifier extractor, trained here


def holdout_split(n: int, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held out): a seeded permutation, the first `holdout` held out."""
    if not 0 <= holdout < n:
        raise ValueError(f"reference.holdout = {holdout} must be in [0, {n}) for {n} images")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[holdout:]), np.sort(perm[:holdout])


@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread: float sums then run in one order whatever the core count, so the weights are the same
    bytes on a laptop and on a 16-core node (and a net this small gains little from threads anyway)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@single_thread()
def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int,
                     params: ReferenceParams) -> ClassifierExtractor:
    """Adam on cross-entropy for `classifier_steps` steps, on one CPU thread, with a seeded init and data order:
    the same images and params give the same weights. Images uint8 (N, H, W, 3); labels int64 in [0, num_classes)."""
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ArtifactError(f"labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes})")
    torch.manual_seed(params.seed)
    arch = classifier_arch(num_classes, images.shape[1])
    net = build_classifier(arch).train()
    opt = torch.optim.Adam(net.parameters(), lr=params.classifier_lr)
    gen = torch.Generator().manual_seed(params.seed)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
    y_all = torch.from_numpy(labels)
    order = torch.empty(0, dtype=torch.long)
    for _ in tqdm(range(params.classifier_steps), desc="classifier", unit="step"):
        if len(order) < params.classifier_batch_size:  # a fresh seeded epoch order
            order = torch.cat([order, torch.randperm(len(images), generator=gen)])
        idx, order = order[: params.classifier_batch_size], order[params.classifier_batch_size :]
        x = x_all[idx].float()
        # The DiT trains on random flips, so its samples are mirrored as often as not: classify both alike.
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(net.classify(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return ClassifierExtractor(net.eval(), arch, torch.device("cpu"))


def classifier_accuracy(extractor: Extractor, images: np.ndarray, labels: np.ndarray, batch_size: int) -> float:
    logits = extractor.extract(images, batch_size).logits
    return float((logits.argmax(axis=1) == labels).mean())


# ---------------------------------------------------------------------------------------------------------------------
# The stage


def build_extractor(images: np.ndarray | None, labels: np.ndarray | None, num_classes: int,
                    params: ReferenceParams, device: torch.device) -> tuple[Extractor, float | None]:
    """The configured extractor on `device`, and the classifier's held-out accuracy (None for Inception)."""
    if params.extractor == "inception":
        return InceptionExtractor(resolve_inception_weights(params.inception_weights), params.mode, device), None
    train, held = holdout_split(len(images), params.holdout, params.seed)
    trained = train_classifier(images[train], labels[train], num_classes, params)
    accuracy = classifier_accuracy(trained, images[held], labels[held], params.batch_size) if len(held) else None
    return ClassifierExtractor(trained.net, trained.arch, device), accuracy


class Moments:
    """Streaming mean and covariance in float64 (sums of a shifted x, so that large means cancel nothing):
    the statistics of 1.28M Inception features without holding them all."""

    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, 0.0, 0.0

    def add(self, x: np.ndarray) -> None:  # x (n, D)
        if self.shift is None:
            self.shift = x.mean(axis=0)
        y = x - self.shift
        self.n, self.s1, self.s2 = self.n + len(x), self.s1 + y.sum(axis=0), self.s2 + y.T @ y

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """mu (D,), sigma (D, D): the unbiased covariance, as np.cov(rowvar=False)."""
        if self.n < 2:
            raise ValueError(f"reference statistics need at least 2 images, got {self.n}")
        m = self.s1 / self.n
        return self.shift + m, (self.s2 - self.n * np.outer(m, m)) / (self.n - 1)


def kept_rows(count: int, max_features: int | None, seed: int) -> np.ndarray:
    """Rows whose features are stored for KID and precision/recall: all, or a seeded subset of max_features."""
    if max_features is None or max_features >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, max_features, replace=False))


def extract_dataset(images_dir: Path, manifest: dict, extractor: Extractor, params: ReferenceParams):
    """Stream the shards: mu, sigma over every real image; features (M, D) float32 and labels of the kept rows."""
    keep = kept_rows(manifest["count"], params.max_features, params.seed)
    moments, features, labels, offset = Moments(), [], [], 0
    with tqdm(total=manifest["count"], desc=f"reference {extractor.name} features", unit="img") as bar:
        for images, y in data.iter_image_shards(images_dir):
            f = extractor.extract(images, params.batch_size, pbar=bar).features  # (n, D) float64
            moments.add(f)
            rows = keep[(keep >= offset) & (keep < offset + len(f))] - offset
            features.append(f[rows].astype(np.float32))
            labels.append(y[rows])
            offset += len(f)
    mu, sigma = moments.mean_cov()
    return mu, sigma, np.concatenate(features), np.concatenate(labels)


def write_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """An uncompressed .npz with fixed zip timestamps, so equal arrays give equal bytes (np.savez stamps the time)."""
    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for name, array in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)
    return atomic_write(path, write)


def build_reference(images_dir: str | Path, out_dir: str | Path, params: ReferenceParams) -> dict:
    """Run the stage: write `out_dir` (dit-reference v1) and return the stage metrics."""
    start = time.time()
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    device = select_device(params.use_gpu, "reference")
    if params.extractor == "classifier":
        images, labels, manifest = data.read_images(images_dir)
    else:  # Inception needs no training data in memory: the features are extracted shard by shard below
        images = labels = None
        manifest = data.read_manifest(images_dir)
    extractor, accuracy = build_extractor(images, labels, manifest["num_classes"], params, device)
    del images
    mu, sigma, features, labels = extract_dataset(images_dir, manifest, extractor, params)
    stats_path = write_npz(out_dir / STATS_FILE, mu=mu, sigma=sigma, features=features, labels=labels)
    config = save_extractor(out_dir, extractor, params.inception_weights)
    write_manifest(
        out_dir, REFERENCE_FORMAT, REFERENCE_VERSION,
        extractor=extractor.name, mode=extractor.mode, count=manifest["count"], feature_dim=len(mu),
        features_kept=len(features), image_size=manifest["image_size"], num_classes=manifest["num_classes"],
        class_names=manifest["class_names"], classifier_holdout=params.holdout if accuracy is not None else None,
        classifier_accuracy=accuracy, images_manifest_sha256=sha256_file(images_dir / "manifest.json"),
        classifier_sha256=config["weights_sha256"] if extractor.name == "classifier" else None,
        inception_sha256=config["weights_sha256"] if extractor.name == "inception" else None,
        stats_sha256=sha256_file(stats_path),
    )
    seconds = round(time.time() - start, 2)  # the metrics: the count and the rest are in the manifest
    return {"seconds": seconds} if accuracy is None else {"classifier_accuracy": accuracy, "seconds": seconds}
