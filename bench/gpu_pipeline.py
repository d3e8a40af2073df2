"""The pipeline itself on one GPU: every stage's entry point in DAG order, in-process, with profiles/gpu-smoke.yaml.

    python bench/gpu_pipeline.py                 # on the device (bench/gpu_checks.sh runs it)
    python bench/gpu_pipeline.py --cpu-dry-run   # the same code path on the CPU at tiny sizes
                                                 # (tests/test_gpu_pipeline.py)

The device has torch and diffusers but no Ray, MLflow or DVC, so: tracking is off (the profile), `train` and
`sample` take their in-process paths (num_workers 0, the profile), and `encode`, whose stage always runs Ray Data,
runs its in-process path `encode_local` (the same LatentEncoder on the same device). Every other stage runs its
`stages/<name>.py` main with the argv of its dvc.yaml command. The VAE is a random-weight snapshot shaped like SD's
(downsample 8, 4 channels), made here: paths and throughput, not quality.

Checks, each an assertion (a failed one exits non-zero):
- every stage's outputs exist, and the training loss and the samples are finite / well-formed;
- every stage that computes on the GPU by design allocated CUDA memory while it ran (ingest decodes images and
  `vae` copies a snapshot and measures PSNR: both CPU by design, reported as such);
- `train`'s steady-state img/s (the median of its logged intervals after the first, which holds the compile) is at
  least 0.9x bench/bench_train.py's step on the same params, measured in the same process right after.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline.params.train import TrainParams

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STAGES = ("ingest", "vae", "encode", "train", "reference", "sample", "evaluate")
CPU_BY_DESIGN = {"ingest": "decodes and writes images", "vae": "copies the snapshot; PSNR on the CPU"}
SNAPSHOT = "inputs/sd-vae-random"
MIN_TRAIN_RATIO = 0.9
# --cpu-dry-run: the same stages at sizes a 2-core CPU runs in a minute or two.
CPU_DRY_RUN = {
    "ingest": {"image_size": 64, "synthetic": {"num_images": 96}},
    "vae": {"holdout": 8},
    "encode": {"batch_size": 32, "micro_batch": 16, "use_gpu": False},
    "train": {
        "model": "DiT-Ti/2",
        "global_batch_size": 8,
        "train_steps": 4,
        "log_every": 2,
        "ckpt_every": 4,
        "precision": "fp32",
        "compile": False,
        "use_gpu": False,
    },
    "reference": {"classifier_steps": 2, "holdout": 16, "batch_size": 32, "use_gpu": False},
    "sample": {
        "num_fid_samples": 32,
        "batch_size": 16,
        "micro_batch": 16,
        "shard_size": 16,
        "steps": 2,
        "precision": "fp32",
        "compile": False,
        "use_gpu": False,
    },
    "evaluate": {"kid_subsets": 2, "kid_subset_size": 16, "batch_size": 32, "use_gpu": False},
    "curve": {"precision": "fp32", "use_gpu": False},
}


def merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for k, v in overlay.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def write_params(workdir: Path, dry_run: bool) -> Path:
    """params.yaml + profiles/gpu-smoke.yaml (+ the tiny sizes of a dry run), validated as `make exp` would."""
    from pipeline.profiles import validate

    params = merge(
        yaml.safe_load((ROOT / "params.yaml").read_text()),
        yaml.safe_load((ROOT / "profiles" / "gpu-smoke.yaml").read_text()),
    )
    if dry_run:
        params = merge(params, CPU_DRY_RUN)
    else:
        validate(params, "params.yaml + profile gpu-smoke")
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def write_random_sd_vae(workdir: Path, params_path: Path, dry_run: bool) -> None:
    """A save_pretrained snapshot with SD-VAE's layout (4 levels, downsample 8, 4 latent channels, scale 0.18215),
    random weights; narrower channels in a dry run."""
    from diffusers import AutoencoderKL

    from pipeline.autoencoder import save_snapshot

    size = yaml.safe_load(params_path.read_text())["ingest"]["image_size"]
    channels, groups = ((16, 32, 32, 32), 8) if dry_run else ((128, 256, 512, 512), 32)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=groups,
        sample_size=size,
        scaling_factor=0.18215,
    )
    save_snapshot(vae, workdir / SNAPSHOT)


def stage_argv(name: str, params_path: Path) -> tuple[str, list[str]]:
    """(module, argv) of the stage's dvc.yaml command, with our params file."""
    cmd = shlex.split(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]["cmd"])
    assert cmd[:2] == ["python", "-m"], cmd
    argv = cmd[3:]
    argv[argv.index("--params") + 1] = str(params_path)
    return cmd[2], argv


def cuda_allocations() -> int:
    return torch.cuda.memory_stats().get("allocation.all.allocated", 0) if torch.cuda.is_available() else 0


def run_stage(name: str, params_path: Path) -> float:
    start = time.perf_counter()
    if name == "encode":  # the stage runs Ray Data; its in-process path runs the same encoder
        from pipeline.encode import encode_local
        from pipeline.params.encode import EncodeParams
        from pipeline.params.load import load_section

        p = load_section(EncodeParams, "encode", params_path)
        encode_local(p, "data/images", "models/vae", "data/latents", "cuda" if p.use_gpu else "cpu")
    else:
        module, argv = stage_argv(name, params_path)
        saved = sys.argv
        sys.argv = [module, *argv]
        try:
            importlib.import_module(module).main()
        finally:
            sys.argv = saved
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def steady_train_img_per_s(plots: Path) -> float:
    with plots.open() as f:
        rows = [float(r["img_per_s"]) for r in csv.DictReader(f)]
    assert len(rows) >= 2, f"{plots}: {len(rows)} log rows; need >= 2 (the first holds the compile)"
    return statistics.median(rows[1:])


def bench_train_img_per_s(params_path: Path, dry_run: bool) -> float:
    """bench/bench_train.py's timed steps on the stage's own params and latent shape (random latents on device)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_train

    from pipeline.params.load import load_section

    p = load_section(TrainParams, "train", params_path)
    manifest = json.loads(Path("data/latents/manifest.json").read_text())
    torch._dynamo.reset()  # the stage's compiled graphs must not serve the benchmark's model
    r = bench_train.bench_one(
        p,
        tuple(manifest["latent_shape"]),
        manifest["num_classes"],
        "cuda" if p.use_gpu else "cpu",
        warmup=2 if dry_run else 15,
        steps=2 if dry_run else 50,
    )
    return r["img_per_s"]


def check_outputs() -> dict:
    train = json.loads(Path("metrics/train.json").read_text())
    assert np.isfinite(train["loss"]), train
    with np.load("data/samples/samples.npz") as f:
        images = f["arr_0"]
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3, images.shape
    evaluation = json.loads(Path("metrics/eval.json").read_text())
    assert all(np.isfinite(v) for v in evaluation.values() if isinstance(v, (int, float))), evaluation
    return {"train_loss": train["loss"], "samples": list(images.shape), "eval": evaluation}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU: the code path, no figures")
    ap.add_argument("--keep", type=Path, default=None, help="run in this directory and keep it")
    args = ap.parse_args()
    dry = args.cpu_dry_run
    if not dry:
        assert torch.cuda.is_available(), "needs a CUDA device (or --cpu-dry-run)"
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        run_pipeline(args.keep.resolve(), dry)
        return
    # Without --keep the run's ~90 MB (data, latents, checkpoints, samples) go with it, even when a stage fails.
    with tempfile.TemporaryDirectory(prefix="gpu_pipeline-") as tmp:
        try:
            run_pipeline(Path(tmp), dry)
        finally:
            os.chdir(ROOT)


def run_pipeline(workdir: Path, dry: bool) -> None:
    """Every stage in `workdir`, timed, with its CUDA allocations; prints the report as the last line."""
    os.chdir(workdir)  # the stages' relative paths (data/, models/, metrics/) land here, as in a checkout
    params_path = write_params(workdir, dry)
    write_random_sd_vae(workdir, params_path, dry)
    report = {"device": torch.cuda.get_device_name() if not dry else "cpu (dry run)", "stages": {}}
    for name in STAGES:
        before = cuda_allocations()
        seconds = run_stage(name, params_path)
        allocations = cuda_allocations() - before
        on_gpu = allocations > 0
        report["stages"][name] = {"seconds": round(seconds, 1), "cuda_allocations": allocations}
        print(
            f"[gpu_pipeline] {name:<10} {seconds:7.1f} s  cuda allocations {allocations:>8}"
            + (f"  (CPU by design: {CPU_BY_DESIGN[name]})" if name in CPU_BY_DESIGN else ""),
            flush=True,
        )
        if not dry and name not in CPU_BY_DESIGN:
            assert on_gpu, f"stage {name} made no CUDA allocation: it ran on the CPU"
        if name == "train":
            stage = steady_train_img_per_s(Path("plots/train.csv"))
            bench = bench_train_img_per_s(params_path, dry)
            report["train_img_per_s"] = {
                "stage_steady": round(stage, 1),
                "bench_train": round(bench, 1),
                "ratio": round(stage / bench, 3),
            }
            print(
                f"[gpu_pipeline] train stage {stage:.1f} img/s vs bench_train {bench:.1f} img/s: "
                f"{stage / bench:.2f}x (need >= {MIN_TRAIN_RATIO})",
                flush=True,
            )
            if not dry:
                assert stage >= MIN_TRAIN_RATIO * bench, report["train_img_per_s"]
    report["outputs"] = check_outputs()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
