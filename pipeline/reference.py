"""The `reference` stage: feature statistics of the real images, the other half of every FID.

Reads `data/images/` (dit-images v1), builds the configured extractor (for `classifier`, trains it here on CPU with
a fixed seed and data order, holding out `holdout` images to measure its accuracy), extracts features of all real
images and writes `data/reference/` (dit-reference v1): `stats.npz` with `mu`, `sigma` (float64) over all images for
FID, and the `features` (M, D) float32 with their `labels` for KID and precision/recall (all N images, or a seeded
subset of `max_features`, as ADM's reference batches keep 10,000), plus `extractor.json` (+ `classifier.pt`).

Resume. The expensive parts persist in `<shards>` (`data/reference-shards`, a persisted DVC output) as they finish,
each under a key that hashes what determines it (inputs, params, code and package stamp): the trained classifier
(`classifier/<key>/`) and each image shard's features (`features/<key>/features-XXXXX.npz`). A killed run loads
them instead of training or extracting again, so its outputs have the bytes of an uninterrupted run; an ADM batch's
import is not resumed (one pass over its images). Sets of other keys are moved aside to `data/superseded/`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.adm_batch import read_adm_batch
from pipeline.artifacts import ArtifactError, atomic_write_json, sha256_file
from pipeline.code_stamp import stamp
from pipeline.determinism import holdout_split, torch_threads
from pipeline.features import (
    EXTRACTOR_FILE,
    ClassifierExtractor,
    Extractor,
    InceptionExtractor,
    build_classifier,
    classifier_arch,
    load_extractor,
    resolve_inception_weights,
    save_extractor,
    select_device,
)
from pipeline.formats import images as image_shards
from pipeline.formats.reference_stats import STATS_FILE, write_npz, write_reference_manifest
from pipeline.params.reference import ReferenceParams
from pipeline.persisted import open_keyed_dir, superseded_root
from pipeline.provenance import local_input
from pipeline.timing import mark_ready

ACCURACY_FILE = "accuracy.json"  # beside a saved classifier: its held-out accuracy, written last


# ---------------------------------------------------------------------------------------------------------------------
# The classifier extractor, trained here


@torch_threads(1)  # the same weights on a laptop and a 16-core node; a net this small gains little from threads
def train_classifier(
    images: np.ndarray, labels: np.ndarray, num_classes: int, params: ReferenceParams
) -> ClassifierExtractor:
    """Adam on cross-entropy for `classifier_steps` steps, on one CPU thread, with a seeded init and data order:
    the same images and params give the same weights. Images uint8 (N, H, W, 3); labels int64 in [0, num_classes)."""
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ArtifactError(f"labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes})")
    mark_ready()
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


def build_extractor(
    images: np.ndarray | None,
    labels: np.ndarray | None,
    num_classes: int,
    params: ReferenceParams,
    device: torch.device,
) -> tuple[Extractor, float | None]:
    """The configured extractor on `device`, and the classifier's held-out accuracy (None for Inception)."""
    if params.extractor == "inception":
        return InceptionExtractor(resolve_inception_weights(params.inception_weights), params.mode, device), None
    train, held = holdout_split(len(images), params.holdout, params.seed, "reference.holdout")
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


def extract_dataset(
    images_dir: Path, manifest: dict, extractor: Extractor, params: ReferenceParams, features_dir: Path
):
    """Stream the shards: mu, sigma over every real image; features (M, D) float32 and labels of the kept rows.
    Each shard's features are saved in `features_dir` as they finish, and read from there when a killed run left
    them."""
    keep = kept_rows(manifest["count"], params.max_features, params.seed)
    moments, features, labels, offset = Moments(), [], [], 0
    with tqdm(total=manifest["count"], desc=f"reference {extractor.name} features", unit="img") as bar:
        for s, shard in enumerate(manifest["shards"]):
            done = features_dir / f"features-{s:05d}.npz"
            if done.is_file():
                with np.load(done) as saved:
                    f, y = saved["features"], saved["labels"]  # (n, D) float64, (n,)
                bar.update(len(f))
            else:
                images, y = image_shards.read_shard(images_dir, shard, manifest["image_size"])
                f = extractor.extract(images, params.batch_size, pbar=bar).features  # (n, D) float64
                write_npz(done, features=f, labels=y)
            moments.add(f)
            rows = keep[(keep >= offset) & (keep < offset + len(f))] - offset
            features.append(f[rows].astype(np.float32))
            labels.append(y[rows])
            offset += len(f)
    mu, sigma = moments.mean_cov()
    return mu, sigma, np.concatenate(features), np.concatenate(labels)


def import_adm_batch(images_dir: Path, out_dir: Path, params: ReferenceParams, device: torch.device) -> dict:
    """`reference.adm_batch`: write `out_dir` from ADM's reference batch. FID then compares against the whole-dataset
    mu/sigma the file stores (not the statistics of its arr_0), sFID against its mu_s/sigma_s, and KID and
    precision/recall against the features of arr_0 (a seeded subset of max_features), as ADM's evaluator does."""
    start = time.time()
    manifest = image_shards.read_manifest(images_dir)  # the classes and resolution the samples will have
    batch = read_adm_batch(local_input(params.adm_batch))
    if batch.mu is None:
        raise ArtifactError(f"reference.adm_batch {params.adm_batch} stores no mu/sigma: not an ADM reference batch")
    if batch.images.shape[1:3] != (manifest["image_size"],) * 2:
        raise ArtifactError(
            f"reference.adm_batch {params.adm_batch} holds {batch.images.shape[1]} px images, the "
            f"ingested ones are {manifest['image_size']} px: FID compares one resolution"
        )
    extractor, _ = build_extractor(None, None, manifest["num_classes"], params, device)
    keep = kept_rows(len(batch.images), params.max_features, params.seed)
    features = extractor.extract(batch.images[keep], params.batch_size).features.astype(np.float32)
    spatial = {} if batch.spatial_mu is None else dict(spatial_mu=batch.spatial_mu, spatial_sigma=batch.spatial_sigma)
    stats_path = write_npz(
        out_dir / STATS_FILE,
        mu=batch.mu,
        sigma=batch.sigma,
        features=features,
        labels=np.full(len(features), -1, np.int64),
        **spatial,
    )  # the batch has no labels
    config = save_extractor(out_dir, extractor, params.inception_weights)
    write_reference_manifest(
        out_dir,
        extractor=extractor.name,
        mode=extractor.mode,
        count=None,
        feature_dim=len(batch.mu),
        features_kept=len(features),
        image_size=manifest["image_size"],
        num_classes=manifest["num_classes"],
        class_names=manifest["class_names"],
        classifier_holdout=None,
        classifier_accuracy=None,
        images_manifest_sha256=sha256_file(images_dir / "manifest.json"),
        classifier_sha256=None,
        inception_sha256=config["weights_sha256"],
        stats_sha256=sha256_file(stats_path),
        adm_batch=params.adm_batch,
        adm_batch_sha256=batch.sha256,
        spatial_stats=bool(spatial),
    )
    return {"classifier_accuracy": None, "count": len(features), "seconds": round(time.time() - start, 2)}


def persisted_key(**determining) -> str:
    return hashlib.sha256(json.dumps(determining, sort_keys=True).encode()).hexdigest()[:16]


def resumed_extractor(
    images_dir: Path, manifest: dict, params: ReferenceParams, device: torch.device, shards_dir: Path
) -> tuple[Extractor, float | None, dict]:
    """The extractor, the classifier's held-out accuracy and the extractor's record (its config with the weights'
    sha256). A trained classifier is saved in `shards_dir/classifier/<key>/` and loaded from there on a rerun."""
    if params.extractor == "inception":  # Inception needs no training data: features are extracted shard by shard
        extractor, accuracy = build_extractor(None, None, manifest["num_classes"], params, device)
        return extractor, accuracy, extractor.config()
    key = persisted_key(
        images=sha256_file(images_dir / "manifest.json"),
        steps=params.classifier_steps,
        batch=params.classifier_batch_size,
        lr=params.classifier_lr,
        holdout=params.holdout,
        seed=params.seed,
        batch_size=params.batch_size,
        stamp=stamp("reference"),
    )
    saved = open_keyed_dir(shards_dir / "classifier", key, superseded_root(shards_dir), "reference-classifier")
    if (saved / ACCURACY_FILE).is_file():  # written last: the classifier beside it is whole
        accuracy = json.loads((saved / ACCURACY_FILE).read_text())["classifier_accuracy"]
        return load_extractor(saved, device), accuracy, json.loads((saved / EXTRACTOR_FILE).read_text())
    images, labels, _ = image_shards.read_images(images_dir)
    extractor, accuracy = build_extractor(images, labels, manifest["num_classes"], params, device)
    config = save_extractor(saved, extractor, params.inception_weights)
    atomic_write_json(saved / ACCURACY_FILE, {"classifier_accuracy": accuracy})
    return extractor, accuracy, config


def build_reference(
    images_dir: str | Path, out_dir: str | Path, params: ReferenceParams, shards_dir: str | Path | None = None
) -> dict:
    """Run the stage: write `out_dir` (dit-reference v1) and return the stage metrics. `shards_dir` (default
    `<out_dir>-shards`) keeps the classifier and the features of finished image shards across a kill."""
    start = time.time()
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    shards_dir = Path(shards_dir) if shards_dir else Path(f"{out_dir}-shards")
    device = select_device(params.use_gpu, "reference")
    if local_input(params.adm_batch) is not None:
        return import_adm_batch(images_dir, out_dir, params, device)
    manifest = image_shards.read_manifest(images_dir)
    extractor, accuracy, record = resumed_extractor(images_dir, manifest, params, device, shards_dir)
    key = persisted_key(
        images=sha256_file(images_dir / "manifest.json"),
        extractor=record,
        batch_size=params.batch_size,
        device=device.type,
        stamp=stamp("reference"),
    )
    features_dir = open_keyed_dir(
        shards_dir / "features",
        key,
        superseded_root(shards_dir),
        "reference-features",
        need_bytes=lambda moved_bytes: moved_bytes,
    )
    mu, sigma, features, labels = extract_dataset(images_dir, manifest, extractor, params, features_dir)
    stats_path = write_npz(out_dir / STATS_FILE, mu=mu, sigma=sigma, features=features, labels=labels)
    config = save_extractor(out_dir, extractor, params.inception_weights)
    write_reference_manifest(
        out_dir,
        extractor=extractor.name,
        mode=extractor.mode,
        count=manifest["count"],
        feature_dim=len(mu),
        features_kept=len(features),
        image_size=manifest["image_size"],
        num_classes=manifest["num_classes"],
        class_names=manifest["class_names"],
        classifier_holdout=params.holdout if accuracy is not None else None,
        classifier_accuracy=accuracy,
        images_manifest_sha256=sha256_file(images_dir / "manifest.json"),
        classifier_sha256=config["weights_sha256"] if extractor.name == "classifier" else None,
        inception_sha256=config["weights_sha256"] if extractor.name == "inception" else None,
        stats_sha256=sha256_file(stats_path),
    )
    seconds = round(time.time() - start, 2)  # the metrics: the count and the rest are in the manifest
    return {"seconds": seconds} if accuracy is None else {"classifier_accuracy": accuracy, "seconds": seconds}
