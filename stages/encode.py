"""DVC stage `encode`: the image shards through the VAE encoder with Ray Data, into latent shards."""

from __future__ import annotations

import argparse

from pipeline.artifacts import remove_stale_temps
from pipeline.encode import run_encode
from pipeline.errors import run_main
from pipeline.params.encode import EncodeParams
from pipeline.params.load import load_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--images", required=True, help="image shards from the ingest stage (data/images)")
    parser.add_argument("--vae", required=True, help="VAE snapshot from the vae stage (models/vae)")
    parser.add_argument("--out", required=True, help="latent shards + manifest (data/latents)")
    parser.add_argument("--metrics", required=True, help="metrics JSON (metrics/encode.json)")
    parser.add_argument("--shards", required=True, help="finished shards, kept across a kill (data/latents-shards)")
    args = parser.parse_args()
    remove_stale_temps(args.out, args.metrics)  # what a killed run left behind

    params = load_section(EncodeParams, "encode", args.params)
    run_encode(params, args.images, args.vae, args.out, args.metrics, shards_dir=args.shards)


if __name__ == "__main__":
    run_main(main)
