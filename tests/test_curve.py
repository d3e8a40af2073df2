"""The curve stage on a tiny run: DiT-Ti/4 on 4x8x8 latents (4 tokens), a 16 px KL-VAE and a classifier reference."""

from __future__ import annotations

import csv
import json
import runpy
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from synthetic import make_shapes, write_images_dir
from tiny_train import NUM_CLASSES, OFF, REPO, TINY, base_params, write_latents

import pipeline.checkpoints as C
import pipeline.curve as CV
import pipeline.train as T
from pipeline.artifacts import ArtifactError
from pipeline.flops import count_gflops_latent
from pipeline.model import DiT, DiT_models
from pipeline.params.curve import CurveParams, check_params as check_curve_params
from pipeline.params.evaluate import EvaluateParams
from pipeline.params.reference import ReferenceParams
from pipeline.reference import build_reference

MODEL = "DiT-Ti/4"  # a preset, so that pipeline.flops can count its Gflops; 4 tokens on 8x8 latents
REFERENCE = dict(
    extractor="classifier",
    mode="clean",
    inception_weights="inputs/none",
    classifier_steps=20,
    classifier_batch_size=16,
    classifier_lr=2e-3,
    holdout=8,
    max_features=None,
    batch_size=16,
    use_gpu=False,
    seed=0,
    adm_batch="inputs/none",
)
CURVE = CurveParams(
    num_samples=16,
    sampler="dpm-solver++",
    steps=3,
    cfg_scale=1.0,
    cfg_channels=None,
    batch_size=16,
    micro_batch=8,
    precision="fp32",
    use_gpu=False,
    seed=0,
)
EVAL = EvaluateParams(pr_k=3, kid_subsets=2, kid_subset_size=8, is_splits=2, batch_size=16, use_gpu=False, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def train_run(root: Path, latents: Path, **changes) -> Path:
    """A 20-step run of the preset with a checkpoint every 5 steps; returns its checkpoint directory."""
    p = base_params(**{"model": MODEL, "train_steps": 20, "ckpt_every": 5, "keep_checkpoints": 10, **changes})
    T.train(p, OFF, latents, root / "checkpoints", root / "dit", root / "metrics.json", root / "train.csv")
    return root / "checkpoints"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_vae):
    root = tmp_path_factory.mktemp("curve")
    latents = write_latents(root / "latents")  # 64 examples, 4 classes; decoded by the VAE to 16 px
    images, labels = make_shapes(48, NUM_CLASSES, 16, seed=0)
    build_reference(
        write_images_dir(root / "images", images, labels, NUM_CLASSES, shard_size=24),
        root / "reference",
        ReferenceParams(**REFERENCE),
    )
    tiny_vae(0.5, seed=1, norm_num_groups=8).save_pretrained(root / "vae")
    train_run(root / "run", latents)
    return {
        "root": root,
        "latents": latents,
        "ckpts": root / "run" / "checkpoints",
        "reference": root / "reference",
        "vae": root / "vae",
    }


def curve(setup, p=CURVE, ckpts=None, official=None) -> dict:
    return CV.run_curve(p, EVAL, ckpts or setup["ckpts"], setup["reference"], setup["vae"], official)


@pytest.fixture(scope="module")
def record(setup) -> dict:
    return curve(setup)


def test_one_point_per_kept_checkpoint(setup, record):
    assert record["steps"] == [5, 10, 15, 20]
    assert record["checkpoints"] == [f"ckpt-{s:07d}.pt" for s in (5, 10, 15, 20)]
    for key in CV.POINT_METRICS:
        assert len(record[key]) == 4
    assert all(np.isfinite(record["fid"])) and all(0 <= c <= 1 for c in record["class_consistency"])
    assert len(set(record["fid"])) == 4  # four different models, not one evaluated four times
    assert record["final_step"] == 20 and record["final_fid"] == record["fid"][-1]
    assert record["final_class_consistency"] == record["class_consistency"][-1]


def test_model_description_counts_the_checkpoint(record):
    assert (record["model"], record["conditioning"], record["patch_size"]) == (MODEL, "adaLN-Zero", 4)
    assert record["tokens"] == 4 and record["latent_size"] == 8
    assert record["gflops"] == count_gflops_latent(MODEL, 8, "adaLN-Zero")
    built = DiT_models[MODEL](input_size=8, num_classes=NUM_CLASSES)
    assert record["params_M"] * 1e6 == pytest.approx(sum(q.numel() for q in built.parameters()))


def test_protocol_is_recorded(record):
    p = record["protocol"]
    assert (p["num_samples"], p["sampler"], p["sampling_steps"], p["cfg_scale"], p["labels"]) == (
        16,
        "dpm-solver++",
        3,
        1.0,
        "balanced",
    )
    assert p["extractor"] == "classifier" and p["reference_count"] == 48 and len(p["reference_stats_sha256"]) == 64
    assert p["kid_subset_size"] == 8 and len(p["vae_sha256"]) == 64 and len(p["latents_sha256"]) == 64


def test_deterministic_and_independent_of_batch_size(setup, record):
    again = curve(setup, replace(CURVE, batch_size=8))  # two sampler loops instead of one: same pixels
    assert again["fid"] == record["fid"] and again["class_consistency"] == record["class_consistency"]


def test_keep_checkpoints_decides_the_points(setup, tmp_path):
    ckpts = train_run(tmp_path, setup["latents"], keep_checkpoints=2)
    assert [f.name for f in C.list_checkpoints(ckpts)] == ["ckpt-0000015.pt", "ckpt-0000020.pt"]
    assert "keep_checkpoints" not in C.RESUME_KEYS  # a sweep may keep more checkpoints of a run it resumes
    assert curve(setup, ckpts=ckpts)["steps"] == [15, 20]


def test_outputs(record, tmp_path):
    CV.write_outputs(
        record,
        tmp_path / "metrics" / "curve.json",
        tmp_path / "reports" / "curve.json",
        tmp_path / "plots" / "curve.csv",
    )
    assert json.loads((tmp_path / "reports" / "curve.json").read_text()) == json.loads(json.dumps(record))
    numbers = json.loads((tmp_path / "metrics" / "curve.json").read_text())  # the last point, scalars only
    assert numbers == {
        "steps": record["steps"][-1],
        **{k: record[k][-1] for k in CV.POINT_METRICS},
        "gflops": record["gflops"],
        "params_M": record["params_M"],
    }
    with open(tmp_path / "plots" / "curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == record["steps"]
    assert [float(r["fid"]) for r in rows] == pytest.approx(record["fid"])


def test_checkpoints_of_another_run_are_refused(setup, tmp_path):
    other = train_run(tmp_path / "other", setup["latents"], seed=1)
    mixed = tmp_path / "mixed"
    shutil.copytree(setup["ckpts"], mixed)
    shutil.copy(other / "ckpt-0000005.pt", mixed / "ckpt-0000001.pt")
    with pytest.raises(ArtifactError, match=r"ckpt-0000001.pt comes from another run .*train.seed"):
        curve(setup, ckpts=mixed)


def test_gflops_need_the_preset_architecture():
    tiny = DiT(input_size=8, patch_size=2, in_channels=4, num_classes=NUM_CLASSES, **TINY).config
    with pytest.raises(ArtifactError, match=r"not the preset 'DiT-Ti/2'.*\['depth', 'hidden_size', 'num_heads'\]"):
        CV.preset_gflops("DiT-Ti/2", tiny)
    with torch.device("meta"):  # the config only
        xl2 = DiT_models["DiT-XL/2"](input_size=32, num_classes=1000).config
    assert round(CV.preset_gflops("DiT-XL/2", xl2), 2) == 118.64  # paper Table 1: 118.6


def test_no_checkpoints(setup, tmp_path):
    with pytest.raises(ArtifactError, match="no checkpoints"):
        curve(setup, ckpts=tmp_path)
    skipped = curve(setup, ckpts=tmp_path, official="models/official/DiT-XL-2-256x256.pt")
    assert skipped["steps"] == [] and skipped["final_fid"] is None and "imported" in skipped["notes"]["curve"]
    assert CV.curve_metrics(skipped) == {}  # no number to compare; the record says why


def test_bad_params():
    with pytest.raises(ValueError, match="curve.num_samples"):
        check_curve_params(replace(CURVE, num_samples=1))


def test_stage_script(setup, tmp_path, monkeypatch):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["curve"].update(num_samples=16, steps=2, micro_batch=8)
    params["evaluate"].update(kid_subset_size=8, kid_subsets=2)
    params["tracking"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = {
        "metrics": tmp_path / "metrics" / "curve.json",
        "report": tmp_path / "reports" / "curve.json",
        "plots": tmp_path / "plots" / "curve.csv",
    }
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "curve.py",
            "--params",
            str(tmp_path / "params.yaml"),
            "--checkpoints",
            str(setup["ckpts"]),
            "--reference",
            str(setup["reference"]),
            "--vae",
            str(setup["vae"]),
            "--metrics",
            str(out["metrics"]),
            "--report",
            str(out["report"]),
            "--plots",
            str(out["plots"]),
        ],
    )
    runpy.run_path(str(REPO / "stages" / "curve.py"), run_name="__main__")
    written = json.loads(out["report"].read_text())
    assert written["steps"] == [5, 10, 15, 20] and written["protocol"]["sampling_steps"] == 2
    numbers = json.loads(out["metrics"].read_text())
    assert numbers["steps"] == 20 and numbers["fid"] == written["fid"][-1] and "protocol" not in numbers
    assert len(out["plots"].read_text().splitlines()) == 5
