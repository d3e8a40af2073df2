"""The metric maths: FID, KID, Inception Score, precision/recall and class consistency, as pure functions of feature
arrays, and `evaluate_images`, which extracts the features of images against a reference and computes them all.
The evaluate stage (pipeline/evaluate.py) and the curve stage share it.
"""

from __future__ import annotations

import numpy as np
import torch
from cleanfid import fid as cleanfid
from scipy.special import log_softmax

from pipeline.features import Extracted, Extractor, SpatialReplayMismatch
from pipeline.formats.reference_stats import Reference
from pipeline.params.evaluate import EvaluateParams

SFID_PROTOCOL = "mixed_6/conv, first 7 channels, NHWC as ADM; against the stored mu_s/sigma_s"
PR_CHUNK_ELEMENTS = 1 << 26  # distance-matrix block: 64M float32 = 256 MB, so 50K x 50K runs in pieces


# ---------------------------------------------------------------------------------------------------------------------
# Metrics: pure functions of features


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017), computed by clean-fid's
    `frechet_distance` so that numbers match clean-fid's; here only the shapes are checked with clear errors."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"Frechet distance needs mu (D,) and sigma (D, D) on both sides, got "
            f"{mu1.shape}, {sigma1.shape} vs {mu2.shape}, {sigma2.shape} (features of different nets?)"
        )
    return float(cleanfid.frechet_distance(mu1, sigma1, mu2, sigma2))


def fid_from_features(features: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> float:
    """FID of features (N, D) against reference statistics; the covariance is unbiased, as in clean-fid."""
    if len(features) < 2:
        raise ValueError(f"FID needs at least 2 samples, got {len(features)}")
    return frechet_distance(features.mean(axis=0), np.cov(features, rowvar=False), ref_mu, ref_sigma)


def kernel_inception_distance(
    fake: np.ndarray, real: np.ndarray, num_subsets: int, subset_size: int, seed: int
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): the unbiased MMD^2 with kernel k(x, y) = (x.y / D + 1)^3, averaged over
    `num_subsets` random subsets of min(subset_size, N_fake, N_real) points from each side. Returns (mean, std).

    The estimator and the draw order are clean-fid's `kernel_distance(real, fake, ...)`; the draws come from a
    seeded RandomState instead of the global one, and the spread over subsets is returned too."""
    fake, real = np.asarray(fake, np.float64), np.asarray(real, np.float64)
    m = min(subset_size, len(fake), len(real))
    if m < 2:
        raise ValueError(f"KID needs at least 2 points per side, got {len(fake)} fake and {len(real)} real")
    d = fake.shape[1]
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(num_subsets):
        x = fake[rng.choice(len(fake), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        k_same = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3  # (m, m)
        k_cross = (x @ y.T / d + 1) ** 3  # (m, m)
        mmd2 = (k_same.sum() - np.trace(k_same)) / (m * (m - 1)) - 2 * k_cross.sum() / (m * m)
        values.append(mmd2)
    return float(np.mean(values)), float(np.std(values))


def inception_score(logits: np.ndarray, num_splits: int) -> tuple[float, float]:
    """IS (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)) per split of the samples; (mean, std) over splits."""
    log_p = log_softmax(np.asarray(logits, np.float64), axis=1)  # (N, K)
    scores = []
    for part in np.array_split(log_p, num_splits):
        log_py = np.log(np.exp(part).mean(axis=0))  # (K,) the marginal of this split
        kl = (np.exp(part) * (part - log_py)).sum(axis=1)  # (n,)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, D), (m, D) -> squared Euclidean distances (n, m)."""
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)[None]).clamp_min_(0)


def _row_chunks(n_rows: int, n_cols: int, max_elements: int):
    step = max(1, max_elements // max(n_cols, 1))
    return (slice(s, s + step) for s in range(0, n_rows, step))


def knn_sq_radii(x: torch.Tensor, k: int, max_elements: int = PR_CHUNK_ELEMENTS) -> torch.Tensor:
    """Squared distance from each point of x (N, D) to its k-th nearest other point: (N,)."""
    if len(x) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per side, got {len(x)}")
    # Each point is its own nearest neighbour at distance 0, so the k-th other point is the (k+1)-th smallest.
    return torch.cat(
        [_sq_distances(x[rows], x).kthvalue(k + 1, dim=1).values for rows in _row_chunks(len(x), len(x), max_elements)]
    )


def _coverage(points: torch.Tensor, centers: torch.Tensor, sq_radii: torch.Tensor, max_elements: int) -> float:
    """Fraction of points inside at least one ball (center, radius)."""
    inside = [
        (_sq_distances(points[rows], centers) <= sq_radii[None]).any(dim=1)
        for rows in _row_chunks(len(points), len(centers), max_elements)
    ]
    return int(torch.cat(inside).sum()) / len(points)


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int, device: torch.device, max_elements: int = PR_CHUNK_ELEMENTS
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): each manifold is the union of balls around its
    points with radius the distance to the k-th nearest neighbour. Precision = fraction of fake points inside the
    real manifold; recall = fraction of real points inside the fake manifold. Distances go in row blocks."""
    real_t = torch.as_tensor(np.asarray(real, np.float32), device=device)
    fake_t = torch.as_tensor(np.asarray(fake, np.float32), device=device)
    precision = _coverage(fake_t, real_t, knn_sq_radii(real_t, k, max_elements), max_elements)
    recall = _coverage(real_t, fake_t, knn_sq_radii(fake_t, k, max_elements), max_elements)
    return precision, recall


def class_consistency(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of conditional samples that the classifier assigns to their conditioning label."""
    return float((np.asarray(logits).argmax(axis=1) == np.asarray(labels)).mean())


# ---------------------------------------------------------------------------------------------------------------------
# Putting them together


def evaluate_features(
    fake: Extracted,
    labels: np.ndarray | None,
    reference: Reference,
    extractor_name: str,
    params: EvaluateParams,
    device: torch.device,
) -> dict:
    """All metrics of the samples' features and logits against the reference.
    The single place that returns the metrics dict: stages log it as is. Null metrics carry a reason in `notes`."""
    fid = fid_from_features(fake.features, reference.mu, reference.sigma)
    kid, kid_std = kernel_inception_distance(
        fake.features, reference.features, params.kid_subsets, params.kid_subset_size, params.seed
    )
    precision, recall = precision_recall(reference.features, fake.features, params.pr_k, device)
    notes = {}
    is_mean = is_std = consistency = None
    if extractor_name == "inception":
        is_mean, is_std = inception_score(fake.logits, params.is_splits)
        notes["class_consistency"] = "needs the classifier extractor (Inception's classes are not the dataset's)"
    else:
        notes["inception_score"] = f"defined on Inception-V3's ImageNet logits; not reported with the {extractor_name}"
        if labels is None:
            notes["class_consistency"] = "the samples carry no labels"
        else:
            consistency = class_consistency(fake.logits, labels)
    return {
        "fid": fid,
        "kid": kid,
        "kid_std": kid_std,
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "precision": precision,
        "recall": recall,
        "class_consistency": consistency,
        "notes": notes,
    }


def extract_for_reference(
    images: np.ndarray, reference: Reference, extractor: Extractor, batch_size: int
) -> tuple[Extracted, str | None]:
    """The samples' features, with sFID's spatial ones where the reference stores spatial statistics; and why sFID
    cannot be computed, if it cannot (the extractor lacks the layer, or replaying its input path fails the check):
    then the other metrics still come, and the reason goes into the notes."""
    if reference.spatial_mu is None:
        return extractor.extract(images, batch_size), None
    blocker = extractor.spatial_unavailable()
    if blocker is None:
        try:
            return extractor.extract(images, batch_size, spatial=True), None
        except SpatialReplayMismatch as e:
            blocker = str(e)
    return extractor.extract(images, batch_size), blocker


def evaluate_images(
    images: np.ndarray, labels: np.ndarray | None, reference: Reference, extractor: Extractor, params: EvaluateParams
) -> dict:
    if images.shape[1:3] != (reference.image_size, reference.image_size):
        raise ValueError(
            f"samples are {images.shape[1]}x{images.shape[2]}, the reference images "
            f"{reference.image_size}x{reference.image_size}: FID compares one resolution"
        )
    k = reference.num_classes
    if labels is not None and k is not None and not 0 <= labels.min() <= labels.max() < k:
        raise ValueError(f"sample labels span [{labels.min()}, {labels.max()}], outside [0, {k})")
    fake, sfid_blocker = extract_for_reference(images, reference, extractor, params.batch_size)
    metrics = evaluate_features(fake, labels, reference, extractor.name, params, extractor.device)
    if reference.spatial_mu is not None:  # sFID where the reference stores spatial statistics (ADM batches)
        metrics["sfid"] = (
            None
            if fake.spatial is None
            else fid_from_features(fake.spatial, reference.spatial_mu, reference.spatial_sigma)
        )
        if sfid_blocker:
            metrics["notes"]["sfid"] = f"not computed: {sfid_blocker}"
    kid_subset_size = min(params.kid_subset_size, len(images), len(reference.features))  # as KID uses it
    sfid = {} if reference.spatial_mu is None else {"sfid_features": SFID_PROTOCOL}
    protocol = {
        **reference.description,
        **sfid,
        "num_samples": len(images),
        "pr_k": params.pr_k,
        "kid_subsets": params.kid_subsets,
        "kid_subset_size": kid_subset_size,
        "kid_seed": params.seed,
        "is_splits": params.is_splits if metrics["inception_score"] is not None else None,
    }
    return {**metrics, "protocol": protocol}


# ---------------------------------------------------------------------------------------------------------------------
# CLI
