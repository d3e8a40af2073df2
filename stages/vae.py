"""DVC stage `vae`: snapshot a pretrained KL-VAE, or train the small one on the ingested images."""

from __future__ import annotations

import argparse
import json

from pipeline.artifacts import remove_stale_temps
from pipeline.errors import run_main
from pipeline.params.load import load_section
from pipeline.params.vae import VAEParams
from pipeline.vae import run_vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--images", required=True, help="image shards from the ingest stage (data/images)")
    parser.add_argument("--out", required=True, help="where the save_pretrained snapshot goes (models/vae)")
    parser.add_argument("--metrics", required=True, help="metrics JSON (metrics/vae.json)")
    args = parser.parse_args()
    remove_stale_temps(args.out, args.metrics)  # what a killed run left behind

    params = load_section(VAEParams, "vae", args.params)
    metrics = run_vae(params, args.images, args.out, args.metrics)
    print(json.dumps(metrics))


if __name__ == "__main__":
    run_main(main)
