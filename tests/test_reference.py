"""The reference stage end to end on a few dozen images: outputs, determinism, and bad inputs."""

from __future__ import annotations

import json
import runpy
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import kill_once
from synthetic import make_shapes, save_inception_like, write_images_dir

import pipeline.reference as R
from pipeline.artifacts import ArtifactError, sha256_file
from pipeline.determinism import holdout_split
from pipeline.features import INCEPTION_FILE
from pipeline.formats.reference_stats import load_reference
from pipeline.params.load import ParamsError
from pipeline.params.reference import ReferenceParams
from pipeline.reference import Moments, build_reference, kept_rows

PARAMS = dict(
    extractor="classifier",
    mode="clean",
    inception_weights="inputs/none",
    classifier_steps=20,
    classifier_batch_size=16,
    classifier_lr=2e-3,
    holdout=10,
    max_features=None,
    batch_size=16,
    use_gpu=False,
    seed=0,
    adm_batch="inputs/none",
)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    images, labels = make_shapes(48, 4, 16, seed=0)
    return write_images_dir(tmp_path_factory.mktemp("data") / "images", images, labels, 4, shard_size=20)


def test_reference_outputs(images_dir, tmp_path):
    metrics = build_reference(images_dir, tmp_path / "ref", ReferenceParams(**PARAMS))
    manifest = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    assert (manifest["format"], manifest["version"]) == ("dit-reference", 1)
    assert manifest["extractor"] == "classifier" and manifest["mode"] is None
    assert manifest["count"] == 48 and set(metrics) == {"classifier_accuracy", "seconds"}
    assert manifest["classifier_accuracy"] == metrics["classifier_accuracy"]
    assert manifest["images_manifest_sha256"] == sha256_file(images_dir / "manifest.json")
    assert manifest["classifier_sha256"] == sha256_file(tmp_path / "ref" / "classifier.pt")
    with np.load(tmp_path / "ref" / "stats.npz") as stats:
        feats = stats["features"]
        assert feats.shape == (48, manifest["feature_dim"]) and feats.dtype == np.float32
        assert stats["mu"].dtype == np.float64 and stats["sigma"].shape == (feats.shape[1],) * 2
        np.testing.assert_allclose(stats["mu"], feats.mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["sigma"], np.cov(feats.astype(np.float64), rowvar=False), atol=1e-5)
        labels = pq.read_table(images_dir / "shard-00000.parquet").column("label").to_numpy()
        np.testing.assert_array_equal(stats["labels"][:20], labels)  # rows keep the ingest order


def test_reference_is_deterministic(images_dir, tmp_path):
    build_reference(images_dir, tmp_path / "a", ReferenceParams(**PARAMS))
    build_reference(images_dir, tmp_path / "b", ReferenceParams(**PARAMS))
    for name in ("stats.npz", "classifier.pt", "extractor.json", "manifest.json"):
        assert sha256_file(tmp_path / "a" / name) == sha256_file(tmp_path / "b" / name), name


def test_max_features_keeps_a_subset_and_full_statistics(images_dir, tmp_path):
    build_reference(images_dir, tmp_path / "all", ReferenceParams(**PARAMS))
    build_reference(images_dir, tmp_path / "sub", ReferenceParams(**{**PARAMS, "max_features": 20}))
    assert json.loads((tmp_path / "sub" / "manifest.json").read_text())["features_kept"] == 20
    with np.load(tmp_path / "all" / "stats.npz") as full, np.load(tmp_path / "sub" / "stats.npz") as sub:
        np.testing.assert_array_equal(sub["mu"], full["mu"])  # FID statistics still cover every image
        np.testing.assert_array_equal(sub["sigma"], full["sigma"])
        rows = kept_rows(48, 20, seed=0)
        np.testing.assert_array_equal(sub["features"], full["features"][rows])
        np.testing.assert_array_equal(sub["labels"], full["labels"][rows])


def test_streaming_moments_match_numpy():
    x = np.random.default_rng(0).normal(size=(300, 6)) * 5 + 1e4  # a large mean: the shifted sums keep precision
    moments = Moments()
    for part in np.array_split(x, 7):
        moments.add(part)
    mu, sigma = moments.mean_cov()
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)


def test_stage_script(images_dir, tmp_path, monkeypatch):
    params = tmp_path / "params.yaml"
    params.write_text("reference:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in PARAMS.items()))
    out, metrics = tmp_path / "ref", tmp_path / "metrics" / "reference.json"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "reference.py",
            "--params",
            str(params),
            "--images",
            str(images_dir),
            "--out",
            str(out),
            "--metrics",
            str(metrics),
            "--shards",
            str(tmp_path / "s"),
        ],
    )
    runpy.run_path("stages/reference.py", run_name="__main__")
    assert set(json.loads(metrics.read_text())) == {"classifier_accuracy", "seconds"}  # the count is in the manifest
    assert (out / "manifest.json").exists()


def test_corrupt_shard_is_refused(images_dir, tmp_path):
    bad = tmp_path / "images"
    bad.mkdir()
    for f in images_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "shard-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(ArtifactError, match="shard-00001.parquet.*sha256.*dvc repro ingest"):
        build_reference(bad, tmp_path / "ref", ReferenceParams(**PARAMS))


def test_missing_images_name_the_stage(tmp_path):
    with pytest.raises(ArtifactError, match="dvc repro ingest"):
        build_reference(tmp_path / "nothing", tmp_path / "ref", ReferenceParams(**PARAMS))


def test_holdout_split():
    train, held = holdout_split(50, 10, seed=0, param="reference.holdout")
    assert len(held) == 10 and len(train) == 40 and not set(train) & set(held)
    np.testing.assert_array_equal(held, holdout_split(50, 10, seed=0, param="reference.holdout")[1])
    with pytest.raises(ValueError, match="holdout"):
        holdout_split(10, 10, seed=0, param="reference.holdout")


def test_adm_batch_import_keeps_the_stored_statistics(images_dir, tmp_path):
    """`reference.adm_batch`: stats.npz carries the file's mu/sigma and mu_s/sigma_s as they are, and the features
    of a seeded subset of its arr_0; the ingested images only give the classes and the resolution."""
    rng = np.random.default_rng(0)
    mu, mu_s = rng.normal(size=2048), rng.normal(size=2023)
    sigma, sigma_s = np.diag(rng.uniform(1, 2, 2048)), np.diag(rng.uniform(1, 2, 2023))
    np.savez(tmp_path / "batch.npz", make_shapes(12, 4, 16, seed=1)[0], mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    weights = save_inception_like(tmp_path / "w" / INCEPTION_FILE, seed=0)
    adm = {
        **PARAMS,
        "extractor": "inception",
        "mode": "legacy_tensorflow",
        "inception_weights": str(weights),
        "adm_batch": str(tmp_path / "batch.npz"),
        "max_features": 5,
    }
    metrics = build_reference(images_dir, tmp_path / "ref", ReferenceParams(**adm))
    manifest = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    assert metrics["count"] == 5 and manifest["count"] is None and manifest["features_kept"] == 5
    assert manifest["adm_batch_sha256"] == sha256_file(tmp_path / "batch.npz") and manifest["spatial_stats"]
    reference = load_reference(tmp_path / "ref")
    np.testing.assert_array_equal(reference.mu, mu)
    np.testing.assert_array_equal(reference.sigma, sigma)
    np.testing.assert_array_equal(reference.spatial_mu, mu_s)
    np.testing.assert_array_equal(reference.spatial_sigma, sigma_s)
    assert reference.features.shape == (5, 2048)
    assert reference.description["reference_stats"] == "stored mu/sigma of ADM reference batch"
    with pytest.raises(ParamsError, match="reference.adm_batch.*legacy_tensorflow"):
        ReferenceParams(**{**adm, "mode": "clean"})
    np.savez(tmp_path / "plain.npz", make_shapes(4, 4, 16, seed=1)[0])
    with pytest.raises(ArtifactError, match="stores no mu/sigma"):
        build_reference(
            images_dir, tmp_path / "ref2", ReferenceParams(**{**adm, "adm_batch": str(tmp_path / "plain.npz")})
        )


# A subprocess that extracts features slowly enough to be killed mid-run: every image shard waits first.
SLOW_REFERENCE = """
import json, sys, time
import pipeline.features as F
from pipeline.reference import build_reference
from pipeline.params.reference import ReferenceParams
extract = F.Extractor.extract
F.Extractor.extract = lambda self, images, *a, pbar=None, **k: (pbar is not None and time.sleep(1.0),
                                                                 extract(self, images, *a, pbar=pbar, **k))[1]
images, out, shards, params = sys.argv[1:]
build_reference(images, out, ReferenceParams(**json.loads(params)), shards_dir=shards)
"""


def test_a_killed_reference_resumes_without_training_or_extracting_again(images_dir, tmp_path, monkeypatch):
    out, shards = tmp_path / "ref", tmp_path / "ref-shards"
    kill_once(
        [sys.executable, "-c", SLOW_REFERENCE, str(images_dir), str(out), str(shards), json.dumps(PARAMS)],
        lambda: any(shards.glob("features/*/features-00000.npz")),
    )
    assert not (out / "manifest.json").exists()
    (first,) = shards.glob("features/*/features-00000.npz")
    finished = {f.name: f.stat().st_ino for f in first.parent.glob("features-*.npz")}
    assert 1 <= len(finished) < 3  # of the 3 image shards

    def no_training(*args, **kwargs):
        raise AssertionError("the classifier was trained again")

    monkeypatch.setattr(R, "train_classifier", no_training)
    build_reference(images_dir, out, ReferenceParams(**PARAMS), shards_dir=shards)
    assert {f: (first.parent / f).stat().st_ino for f in finished} == finished  # not extracted again
    monkeypatch.undo()
    build_reference(images_dir, tmp_path / "uninterrupted", ReferenceParams(**PARAMS))
    for name in ("stats.npz", "classifier.pt", "extractor.json", "manifest.json"):
        assert sha256_file(out / name) == sha256_file(tmp_path / "uninterrupted" / name), name


def test_features_of_another_classifier_are_moved_aside(images_dir, tmp_path):
    shards = tmp_path / "ref-shards"
    build_reference(images_dir, tmp_path / "ref", ReferenceParams(**PARAMS), shards_dir=shards)
    build_reference(images_dir, tmp_path / "ref", ReferenceParams(**{**PARAMS, "seed": 1}), shards_dir=shards)
    moved = sorted(p.name.split("-")[1] for p in (tmp_path / "superseded").iterdir())
    assert moved == ["classifier", "features"]  # both sets of seed 0, kept
    assert len(list((tmp_path / "superseded").glob("reference-features-*/*/features-*.npz"))) == 3
