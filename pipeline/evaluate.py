"""The `evaluate` stage: FID, KID, Inception Score, precision/recall and class consistency of the samples.

The stage writes the numbers that people compare to `metrics/eval.json` and, beside them in `reports/eval.json`, the
protocol (sampler, steps, cfg, number of samples, extractor and mode, hashes of the reference statistics and of the
checkpoint) and the reason for each metric left out, because an FID means nothing without them. The metric maths
lives in pipeline/metrics.py, which the curve stage shares.

CLI (any ADM-format npz, arr_0 uint8 (N, H, W, 3), against any reference):
    python -m pipeline.evaluate SAMPLES.npz --reference data/reference [--out metrics.json]
    python -m pipeline.evaluate SAMPLES.npz --reference REAL.npz --mode legacy_tensorflow [--inception-weights F]
An ADM reference batch (VIRTUAL_imagenet256_labeled.npz) as REAL.npz gives ADM's protocol: FID against the stored
whole-dataset mu/sigma, sFID against the stored mu_s/sigma_s, KID and precision/recall against arr_0's features.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pipeline.adm_batch import read_adm_batch, stores_statistics
from pipeline.artifacts import ArtifactError, atomic_write_json, sha256_file
from pipeline.features import Extractor, InceptionExtractor, load_extractor, resolve_inception_weights, select_device
from pipeline.formats.model_card import read_model_json
from pipeline.formats.reference_stats import Reference, load_reference
from pipeline.formats.samples import SAMPLES_FILE, read_samples, read_samples_manifest
from pipeline.metrics import evaluate_images
from pipeline.params.evaluate import EvaluateParams
from pipeline.params.load import load_section

# What evaluate copies from the sample stage's manifest into the protocol.
SAMPLE_PROTOCOL_KEYS = (
    "num_samples",
    "sampler",
    "steps",
    "cfg_scale",
    "cfg_channels",
    "labels",
    "seed",
    "checkpoint_sha256",
)


def sample_protocol(samples_dir: str | Path, model_dir: str | Path) -> dict:
    """The sample stage's settings, checked against the checkpoint the DiT stage wrote."""
    manifest = read_samples_manifest(samples_dir)
    missing = [k for k in SAMPLE_PROTOCOL_KEYS if k not in manifest]
    if missing:
        raise ArtifactError(f"{samples_dir}/manifest.json lacks {missing}; run `dvc repro sample`")
    model = read_model_json(model_dir)
    if "ema_sha256" not in model:
        raise ArtifactError(f"{model_dir}/model.json lacks ema_sha256; run `dvc repro train`")
    if model["ema_sha256"] != manifest["checkpoint_sha256"]:
        raise ArtifactError(
            f"{samples_dir} was sampled from checkpoint {manifest['checkpoint_sha256'][:12]}…, "
            f"{model_dir} holds {model['ema_sha256'][:12]}…; run `dvc repro sample`"
        )
    # The sampling seed is renamed so it cannot be confused with the evaluation's KID seed.
    return {("sample_seed" if k == "seed" else k): manifest[k] for k in SAMPLE_PROTOCOL_KEYS}


def evaluate_stage(
    samples_dir: str | Path, reference_dir: str | Path, model_dir: str | Path, params: EvaluateParams
) -> dict:
    """Run the stage: the metrics with the full protocol (sample settings + reference + evaluation settings)."""
    sampling = sample_protocol(samples_dir, model_dir)
    images, labels = read_samples(Path(samples_dir) / SAMPLES_FILE)
    if len(images) != sampling["num_samples"]:
        raise ArtifactError(f"{samples_dir}: {len(images)} images, the manifest says {sampling['num_samples']}")
    device = select_device(params.use_gpu, "evaluate")
    result = evaluate_images(
        images, labels, load_reference(reference_dir), load_extractor(reference_dir, device), params
    )
    evaluation = result.pop("protocol")
    samples_sha256 = sha256_file(Path(samples_dir) / SAMPLES_FILE)
    return {**result, "protocol": {**sampling, "samples_sha256": samples_sha256, **evaluation}}


def split_evaluation(result: dict) -> tuple[dict, dict]:
    """(numbers, report): the metrics people compare (a metric that was not computed is absent, not null), and the
    protocol and notes that say what they mean."""
    numbers = {k: v for k, v in result.items() if k not in ("protocol", "notes") and v is not None}
    return numbers, {"protocol": result["protocol"], "notes": result["notes"]}


def reference_from_adm_batch(path: Path, extractor: Extractor, batch_size: int) -> Reference:
    """A reference from an ADM-format npz: FID against the whole-dataset `mu`/`sigma` the file stores (ADM's
    reference batches), or, for a plain npz of images, against the statistics of its `arr_0`; KID and
    precision/recall always use the features of `arr_0`, as ADM's evaluator does; sFID the stored `mu_s`/`sigma_s`."""
    batch = read_adm_batch(path)
    features = extractor.extract(batch.images, batch_size).features
    stored = batch.mu is not None
    mu, sigma = (batch.mu, batch.sigma) if stored else (features.mean(axis=0), np.cov(features, rowvar=False))
    description = {
        "extractor": extractor.name,
        "extractor_mode": extractor.mode,
        "feature_dim": features.shape[1],
        "reference_count": None if stored else len(features),
        "reference_features": len(features),
        "reference_stats": "stored mu/sigma of ADM reference batch" if stored else "features of arr_0",
        "reference_features_from": "arr_0 (KID, precision/recall)",
        "reference_npz_sha256": batch.sha256,
    }
    return Reference(
        mu,
        sigma,
        features.astype(np.float32),
        batch.images.shape[1],
        None,
        description,
        batch.spatial_mu,
        batch.spatial_sigma,
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("samples", type=Path, help="ADM-format npz: arr_0 uint8 (N, H, W, 3) [+ labels]")
    p.add_argument(
        "--reference",
        type=Path,
        required=True,
        help="a reference stage directory, or an ADM reference batch / npz of images",
    )
    p.add_argument("--params", default="params.yaml", help="params file with the `evaluate` section")
    p.add_argument("--out", type=Path, help="write the metrics JSON here (default: print it)")
    p.add_argument("--mode", choices=["clean", "legacy_tensorflow"], help="Inception mode for an npz reference")
    p.add_argument("--inception-weights", help="local inception-2015-12-05.pt")
    args = p.parse_args(argv)
    params = load_section(EvaluateParams, "evaluate", args.params)
    device = select_device(params.use_gpu, "evaluate")
    if args.reference.is_dir():
        reference = load_reference(args.reference)
        extractor = load_extractor(args.reference, device, args.inception_weights)
    else:
        if args.mode is None:
            p.error("an npz reference needs --mode (its features are computed here with Inception)")
        if args.mode != "legacy_tensorflow" and stores_statistics(args.reference):
            p.error(
                "the npz stores ADM's mu/sigma, which are TF Inception features of TF's resize: "
                "use --mode legacy_tensorflow"
            )
        extractor = InceptionExtractor(resolve_inception_weights(args.inception_weights), args.mode, device)
        reference = reference_from_adm_batch(args.reference, extractor, params.batch_size)
    images, labels = read_samples(args.samples)
    result = evaluate_images(images, labels, reference, extractor, params)
    result["protocol"]["samples_npz_sha256"] = sha256_file(args.samples)
    if args.out:
        atomic_write_json(args.out, result)
    else:
        json.dump(result, sys.stdout, indent=2)
        print()
    return result


if __name__ == "__main__":
    from pipeline.errors import run_main

    run_main(main)
