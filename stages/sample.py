"""DVC stage `sample`: the trained EMA DiT -> data/samples/ (samples.npz, grid.png, manifest.json, shards/).

    python stages/sample.py --params params.yaml --dit models/dit --vae models/vae --out data/samples \
        --metrics metrics/sample.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.artifacts import atomic_write_json, remove_stale_temps
from pipeline.errors import run_main
from pipeline.formats.model_card import read_model_card
from pipeline.params.load import load_section
from pipeline.params.sample import SampleParams
from pipeline.sample import run_sample
from pipeline.tracking import load_tracking, log_to_training_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--dit", required=True, help="models/dit: ema.pt, model.json, tracking.json")
    ap.add_argument("--vae", required=True, help="models/vae: the diffusers VAE snapshot")
    ap.add_argument("--out", required=True, help="data/samples")
    ap.add_argument("--metrics", required=True, help="metrics/sample.json")
    ap.add_argument(
        "--resume-across-versions",
        action="store_true",
        help="keep finished shards made by other pipeline code or package versions",
    )
    args = ap.parse_args()
    remove_stale_temps(args.out, args.metrics)  # what a killed run left behind

    params = load_section(SampleParams, "sample", args.params)
    tracking = load_tracking(args.params)
    metrics = run_sample(params, read_model_card(args.dit), args.vae, args.out, args.resume_across_versions)
    throughput = ("seconds", "img_per_s", "img_steps_per_s")  # the counts are in the manifest and the log below
    atomic_write_json(args.metrics, {k: metrics[k] for k in throughput if metrics[k] is not None})
    grid = np.asarray(Image.open(Path(args.out) / "grid.png").convert("RGB"))
    log_to_training_run(
        tracking,
        args.dit,
        metrics,
        "sample",
        images={"sample_grid": grid},
        artifacts={str(Path(args.out) / "manifest.json"): "samples"},
    )
    print(f"[sample] {json.dumps(metrics)}")


if __name__ == "__main__":
    run_main(main)
