"""Metrics: closed forms and peer-library parity for the math; the evaluate stage and the CLI end to end."""

from __future__ import annotations

import json
import runpy
import sys

import numpy as np
import pytest
import torch
from cleanfid import fid as cleanfid
from scipy import linalg
from scipy.spatial.distance import cdist
from synthetic import make_shapes, save_tiny_inception, write_images_dir

from pipeline.adm_batch import read_adm_batch
from pipeline.artifacts import ArtifactError, sha256_file, write_manifest
from pipeline.evaluate import evaluate_stage, main, reference_from_adm_batch
from pipeline.features import INCEPTION_FILE, ClassifierExtractor, Extracted, SpatialReplayMismatch, load_extractor
from pipeline.formats.reference_stats import load_reference
from pipeline.metrics import (
    Reference,
    class_consistency,
    evaluate_features,
    evaluate_images,
    fid_from_features,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from pipeline.params.evaluate import EvaluateParams
from pipeline.params.reference import ReferenceParams
from pipeline.reference import build_reference

CPU = torch.device("cpu")
EVAL = EvaluateParams(pr_k=3, kid_subsets=4, kid_subset_size=40, is_splits=2, batch_size=32, use_gpu=False, seed=0)
EVAL_YAML = (
    "evaluate:\n"
    + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in vars(EVAL).items())
    + "tracking:\n  enabled: false\n  experiment: test\n"
)
REF = dict(
    extractor="classifier",
    mode="clean",
    inception_weights="inputs/none",
    classifier_steps=60,
    classifier_batch_size=32,
    classifier_lr=2e-3,
    holdout=20,
    max_features=None,
    batch_size=64,
    use_gpu=False,
    seed=0,
    adm_batch="inputs/none",
)


def gaussian_stats(rng, d):
    a = rng.normal(size=(d, d))
    return rng.normal(size=d), a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------------------------------------------------------------
# Frechet distance


def test_frechet_distance_of_identical_sets_is_zero():
    feats = np.random.default_rng(0).normal(size=(400, 8))
    assert fid_from_features(feats, feats.mean(axis=0), np.cov(feats, rowvar=False)) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_closed_form_for_commuting_covariances():
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: d^2 = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.5, 3, 6), rng.uniform(0.5, 3, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_general_case():
    """Against the symmetric form Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), and clean-fid's fid_from_feats."""
    rng = np.random.default_rng(2)
    (mu1, s1), (mu2, s2) = gaussian_stats(rng, 10), gaussian_stats(rng, 10)
    r1 = linalg.sqrtm(s1).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(r1 @ s2 @ r1).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    x, y = rng.normal(size=(300, 10)), rng.normal(size=(200, 10)) * 1.5 + 0.3
    assert fid_from_features(x, y.mean(axis=0), np.cov(y, rowvar=False)) == pytest.approx(
        cleanfid.fid_from_feats(x, y), rel=1e-10
    )


def test_frechet_distance_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="different nets"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------------------------------------------------------
# KID, IS, precision/recall, class consistency


def test_kid_is_near_zero_for_one_distribution_and_grows_with_the_shift():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(600, 16))
    kids = [
        kernel_inception_distance(rng.normal(size=(600, 16)) + s, real, 10, 300, seed=0)[0]
        for s in (0.0, 0.25, 0.5, 1.0)
    ]
    assert abs(kids[0]) < 0.01 < kids[1] < kids[2] < kids[3]


def test_kid_matches_cleanfid_draw_for_draw():
    rng = np.random.default_rng(4)
    real, fake = rng.normal(size=(120, 8)), rng.normal(size=(90, 8)) + 0.2
    ours, std = kernel_inception_distance(fake, real, num_subsets=5, subset_size=50, seed=7)
    np.random.seed(7)  # clean-fid draws from the global RandomState, fake subset first
    assert ours == pytest.approx(cleanfid.kernel_distance(real, fake, num_subsets=5, max_subset_size=50), rel=1e-12)
    assert std > 0
    assert kernel_inception_distance(fake, real, 5, 50, seed=7) == (ours, std)


def test_inception_score_extremes():
    assert inception_score(np.zeros((100, 10)), 2) == pytest.approx((1.0, 0.0))  # every p(y|x) is uniform
    confident = np.eye(10)[np.arange(100) % 10] * 50  # confident and evenly spread over 10 classes
    mean, std = inception_score(confident, 2)
    assert mean == pytest.approx(10, rel=1e-6) and std == pytest.approx(0, abs=1e-6)
    half = np.eye(10)[np.arange(100) % 5] * 50  # only 5 classes
    assert inception_score(half, 2)[0] == pytest.approx(5, rel=1e-6)


def test_precision_recall_on_constructed_manifolds():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(500, 2))
    same = precision_recall(real, rng.normal(size=(500, 2)), 3, CPU)
    assert min(same) > 0.9
    assert precision_recall(real, rng.normal(size=(500, 2)) + 20, 3, CPU) == (0.0, 0.0)
    two_modes = np.concatenate([rng.normal(size=(250, 2)), rng.normal(size=(250, 2)) + 20])
    precision, recall = precision_recall(two_modes, rng.normal(size=(500, 2)), 3, CPU)  # covers one mode
    assert precision > 0.9 and 0.4 < recall < 0.6


def test_precision_recall_matches_brute_force_in_small_chunks():
    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=(70, 5)), rng.normal(size=(60, 5)) * 1.3
    d_rr, d_ff, d_fr = cdist(real, real), cdist(fake, fake), cdist(fake, real)
    r_real, r_fake = np.sort(d_rr, axis=1)[:, 3], np.sort(d_ff, axis=1)[:, 3]  # 3rd neighbour after self
    expected = ((d_fr <= r_real[None]).any(1).mean(), (d_fr.T <= r_fake[None]).any(1).mean())
    assert precision_recall(real, fake, 3, CPU, max_elements=100) == pytest.approx(expected, abs=1e-9)
    assert precision_recall(real, fake, 3, CPU) == pytest.approx(expected, abs=1e-9)


def test_class_consistency():
    logits = np.eye(4)[[0, 1, 2, 3, 0]]
    assert class_consistency(logits, np.array([0, 1, 2, 3, 1])) == pytest.approx(0.8)


# ---------------------------------------------------------------------------------------------------------------------
# The stage and the CLI


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    images, labels = make_shapes(200, 4, 16, seed=0)
    write_images_dir(root / "images", images, labels, 4, shard_size=100)
    build_reference(root / "images", root / "reference", ReferenceParams(**REF))
    (root / "params.yaml").write_text(EVAL_YAML)
    return root


def write_samples(directory, images, labels, checkpoint="c0ffee" * 10, **overrides):
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / "samples.npz", arr_0=images, labels=labels)
    settings = dict(
        num_samples=len(images),
        sampler="ddpm",
        steps=250,
        cfg_scale=1.5,
        cfg_channels=3,
        labels="balanced",
        seed=0,
        checkpoint_sha256=checkpoint,
    )
    write_manifest(directory, "dit-samples", 1, **{**settings, **overrides})
    return directory


def test_evaluate_stage_records_protocol_and_ranks_samples(data, tmp_path, monkeypatch, write_dit_card):
    ema_sha256 = write_dit_card(tmp_path / "dit")
    good, labels = make_shapes(100, 4, 16, seed=1)  # fresh draws of the real distribution
    write_samples(tmp_path / "good", good, labels, checkpoint=ema_sha256)
    metrics, report = tmp_path / "metrics" / "eval.json", tmp_path / "reports" / "eval.json"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "evaluate.py",
            "--params",
            str(data / "params.yaml"),
            "--samples",
            str(tmp_path / "good"),
            "--reference",
            str(data / "reference"),
            "--model",
            str(tmp_path / "dit"),
            "--metrics",
            str(metrics),
            "--report",
            str(report),
        ],
    )
    runpy.run_path("stages/evaluate.py", run_name="__main__")
    numbers = json.loads(metrics.read_text())
    assert set(numbers) == {"fid", "kid", "kid_std", "precision", "recall", "class_consistency"}  # no IS: no nulls
    result = {**numbers, **json.loads(report.read_text())}
    protocol = result["protocol"]
    assert protocol["sampler"] == "ddpm" and protocol["steps"] == 250 and protocol["cfg_channels"] == 3
    assert protocol["extractor"] == "classifier" and protocol["num_samples"] == 100
    assert protocol["checkpoint_sha256"] == ema_sha256 and protocol["reference_stats_sha256"]
    assert "inception_score" in result["notes"]
    assert result["class_consistency"] > 0.9 and result["precision"] > 0.5 and result["recall"] > 0.5

    noise = np.random.default_rng(0).integers(0, 256, good.shape, dtype=np.uint8)
    bad = evaluate_stage(
        write_samples(tmp_path / "bad", noise, labels, checkpoint=ema_sha256),
        data / "reference",
        tmp_path / "dit",
        EVAL,
    )
    assert bad["fid"] > 2 * result["fid"] and bad["kid"] > result["kid"]
    assert bad["precision"] < 0.5 * result["precision"]
    assert result["protocol"]["samples_sha256"] == sha256_file(tmp_path / "good" / "samples.npz")
    shuffled = evaluate_stage(
        write_samples(tmp_path / "perm", good, (labels + 1) % 4, checkpoint=ema_sha256),
        data / "reference",
        tmp_path / "dit",
        EVAL,
    )
    assert shuffled["class_consistency"] < 0.1 and shuffled["fid"] == pytest.approx(result["fid"])


def test_evaluate_refuses_samples_of_another_checkpoint(data, tmp_path, write_dit_card):
    ema_sha256 = write_dit_card(tmp_path / "dit")
    images, labels = make_shapes(10, 4, 16, seed=1)
    with pytest.raises(ArtifactError, match="dvc repro sample"):
        evaluate_stage(write_samples(tmp_path / "s", images, labels), data / "reference", tmp_path / "dit", EVAL)
    with pytest.raises(ArtifactError, match=r"lacks \['cfg_channels'\]"):
        directory = write_samples(tmp_path / "t", images, labels, checkpoint=ema_sha256)
        manifest = json.loads((directory / "manifest.json").read_text())
        del manifest["cfg_channels"]
        (directory / "manifest.json").write_text(json.dumps(manifest))
        evaluate_stage(directory, data / "reference", tmp_path / "dit", EVAL)


def test_cli_on_an_adm_npz(data, tmp_path):
    images, _ = make_shapes(60, 4, 16, seed=2)
    np.savez(tmp_path / "batch.npz", images)  # ADM layout: positional arr_0, no labels
    with np.load(tmp_path / "batch.npz") as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (60, 16, 16, 3)
    out = tmp_path / "m.json"
    main(
        [
            str(tmp_path / "batch.npz"),
            "--reference",
            str(data / "reference"),
            "--params",
            str(data / "params.yaml"),
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert (
        result["fid"] > 0
        and result["class_consistency"] is None
        and "no labels" in result["notes"]["class_consistency"]
    )
    assert result["protocol"]["num_samples"] == 60 and result["protocol"]["samples_npz_sha256"]
    with pytest.raises(ValueError, match="one resolution"):
        main(
            [
                str(_write_npz(tmp_path / "big.npz", 8, 24)),
                "--reference",
                str(data / "reference"),
                "--params",
                str(data / "params.yaml"),
            ]
        )


def _write_npz(path, n, size):
    np.savez(path, np.zeros((n, size, size, 3), np.uint8))
    return path


def test_inception_reference_and_npz_reference(tmp_path):
    """The Inception path through the reference stage on the TorchScript stand-in (no FID here: a 2048-d sqrtm
    takes minutes on a loaded 2-core CPU), and an npz of real images as a reference with the same features."""
    images, labels = make_shapes(24, 4, 16, seed=0)
    write_images_dir(tmp_path / "images", images, labels, 4, shard_size=10)
    weights = save_tiny_inception(tmp_path / "w" / INCEPTION_FILE, seed=0)
    params = ReferenceParams(**{**REF, "extractor": "inception", "inception_weights": str(weights)})
    metrics = build_reference(tmp_path / "images", tmp_path / "ref", params)
    manifest = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    assert "classifier_accuracy" not in metrics and manifest["classifier_sha256"] is None
    assert (manifest["extractor"], manifest["mode"], manifest["feature_dim"]) == ("inception", "clean", 2048)
    assert manifest["inception_sha256"] == sha256_file(weights)
    extractor = load_extractor(tmp_path / "ref", CPU)
    reference = load_reference(tmp_path / "ref")
    np.savez(tmp_path / "real.npz", images[:8])
    from_npz = reference_from_adm_batch(tmp_path / "real.npz", extractor, batch_size=4)
    np.testing.assert_allclose(from_npz.features, reference.features[:8], rtol=1e-5, atol=1e-5)
    assert from_npz.description["reference_count"] == 8 and from_npz.description["extractor_mode"] == "clean"
    assert from_npz.description["reference_stats"] == "features of arr_0"  # a plain npz of images stores no mu/sigma
    with pytest.raises(SystemExit):  # an npz reference needs the Inception mode
        main([str(tmp_path / "real.npz"), "--reference", str(tmp_path / "real.npz")])


def test_inception_features_report_is_not_class_consistency():
    rng = np.random.default_rng(8)
    real = rng.normal(size=(80, 8))
    reference = Reference(real.mean(axis=0), np.cov(real, rowvar=False), real.astype(np.float32), 16, 4, {})
    fake = Extracted(features=rng.normal(size=(60, 8)), logits=rng.normal(size=(60, 1008)) * 3)
    m = evaluate_features(fake, rng.integers(0, 4, 60), reference, "inception", EVAL, CPU)
    assert (m["inception_score"], m["inception_score_std"]) == inception_score(fake.logits, EVAL.is_splits)
    assert m["class_consistency"] is None and "classifier" in m["notes"]["class_consistency"]
    assert m["fid"] == pytest.approx(fid_from_features(fake.features, reference.mu, reference.sigma))


# ---------------------------------------------------------------------------------------------------------------------
# ADM reference batches: FID against the stored whole-dataset statistics, sFID against the stored spatial ones


class SpatialClassifier(ClassifierExtractor):
    """The classifier extractor with its first conv's activations (2 channels of 8 x 8 on 16-px images, NHWC) as
    spatial features: a 128-d stand-in for Inception's 2023-d mixed_6/conv taps, whose Frechet distance needs
    minutes of sqrtm on this CPU."""

    def spatial_unavailable(self):
        return None

    def _batch_spatial(self, x):
        f, logits = self._batch(x)
        first = self.net.body[:3](x / 127.5 - 1.0)  # (B, 32, 8, 8)
        return f, logits, first[:, :2].permute(0, 2, 3, 1).reshape(len(x), -1)


def stats(x):
    return x.mean(axis=0), np.cov(x, rowvar=False)


@pytest.fixture(scope="module")
def adm_batch(data, tmp_path_factory):
    """An ADM-style batch whose stored mu/sigma (and mu_s/sigma_s) are NOT the statistics of its arr_0: as
    VIRTUAL_imagenet256_labeled.npz, whose mu/sigma cover all of ImageNet's train set and arr_0 10K of its images."""
    extractor = load_extractor(data / "reference", CPU)
    spatial = SpatialClassifier(extractor.net, extractor.arch, CPU)
    images = make_shapes(80, 4, 16, seed=5)[0]
    whole = make_shapes(300, 4, 16, seed=6)[0]  # "the whole dataset", of which arr_0 is not a fair sample
    whole = np.clip(whole.astype(int) + 40, 0, 255).astype(np.uint8)
    out = spatial.extract(whole, 64, spatial=True)
    (mu, sigma), (mu_s, sigma_s) = stats(out.features), stats(out.spatial)
    path = tmp_path_factory.mktemp("adm") / "VIRTUAL_test.npz"
    np.savez(path, images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)  # ADM's layout: positional arr_0
    return path, spatial, (mu, sigma, mu_s, sigma_s), images


def test_fid_against_an_adm_batch_uses_its_stored_statistics(adm_batch):
    path, extractor, (mu, sigma, mu_s, sigma_s), images = adm_batch
    reference = reference_from_adm_batch(path, extractor, 64)
    samples, labels = make_shapes(60, 4, 16, seed=7)
    result = evaluate_images(samples, labels, reference, extractor, EVAL)
    fake = extractor.extract(samples, 64, spatial=True)
    stored_fid = cleanfid.frechet_distance(*stats(fake.features), mu, sigma)
    arr_0_fid = cleanfid.frechet_distance(*stats(fake.features), *stats(extractor.extract(images, 64).features))
    assert result["fid"] == pytest.approx(stored_fid, rel=1e-9)
    assert abs(stored_fid - arr_0_fid) > 0.1 * stored_fid  # the construction makes the two answers differ
    assert result["sfid"] == pytest.approx(cleanfid.frechet_distance(*stats(fake.spatial), mu_s, sigma_s), rel=1e-9)
    # KID and precision/recall need real features: those of arr_0, as ADM's evaluator
    np.testing.assert_allclose(reference.features, extractor.extract(images, 64).features, rtol=1e-6)
    protocol = result["protocol"]
    assert protocol["reference_stats"] == "stored mu/sigma of ADM reference batch"
    assert protocol["reference_count"] is None and protocol["reference_features"] == 80
    assert protocol["reference_npz_sha256"] == sha256_file(path) and "arr_0" in protocol["reference_features_from"]
    assert "mixed_6/conv" in protocol["sfid_features"]


def test_sfid_is_null_with_the_reason_when_the_extractor_has_no_spatial_features(adm_batch, data):
    path, _, _, _ = adm_batch
    plain = load_extractor(data / "reference", CPU)  # the classifier: no mixed_6/conv
    result = evaluate_images(
        make_shapes(30, 4, 16, seed=8)[0], None, reference_from_adm_batch(path, plain, 64), plain, EVAL
    )
    assert result["sfid"] is None and "mixed_6/conv" in result["notes"]["sfid"]
    assert np.isfinite(result["fid"])


class MisreplayedClassifier(SpatialClassifier):
    """An extractor whose replay check fails, as InceptionExtractor's would if the port's input path changed."""

    def _batch_spatial(self, x):
        raise SpatialReplayMismatch("the replayed input path gives other pool3 features")


def test_sfid_is_null_with_the_reason_when_the_replay_check_fails(adm_batch):
    path, spatial, _, _ = adm_batch
    extractor = MisreplayedClassifier(spatial.net, spatial.arch, CPU)
    samples = make_shapes(30, 4, 16, seed=8)[0]
    result = evaluate_images(samples, None, reference_from_adm_batch(path, extractor, 64), extractor, EVAL)
    assert result["sfid"] is None and "replayed input path" in result["notes"]["sfid"]
    assert result["fid"] == pytest.approx(
        evaluate_images(samples, None, reference_from_adm_batch(path, spatial, 64), spatial, EVAL)["fid"]
    )


def test_adm_batch_format_errors(tmp_path):
    images = np.zeros((4, 16, 16, 3), np.uint8)
    np.savez(tmp_path / "half.npz", images, mu=np.zeros(3))
    with pytest.raises(ArtifactError, match="has mu but not sigma"):
        read_adm_batch(tmp_path / "half.npz")
    np.savez(tmp_path / "stats.npz", images, mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(SystemExit):  # stored TF-Inception statistics compared with clean-mode features
        main([str(tmp_path / "stats.npz"), "--reference", str(tmp_path / "stats.npz"), "--mode", "clean"])
