"""Stage `reference`: feature statistics of the real images (data/images -> data/reference)."""

from __future__ import annotations

import argparse

from pipeline.artifacts import atomic_write_json, remove_stale_temps
from pipeline.errors import run_main
from pipeline.params.load import load_section
from pipeline.params.reference import ReferenceParams
from pipeline.reference import build_reference


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--images", required=True, help="ingested images (dit-images v1)")
    p.add_argument("--out", required=True, help="output directory (dit-reference v1)")
    p.add_argument("--metrics", required=True)
    p.add_argument(
        "--shards",
        required=True,
        help="the classifier and finished shards' features, kept across a kill (data/reference-shards)",
    )
    args = p.parse_args()
    remove_stale_temps(args.out, args.metrics)  # what a killed run left behind

    params = load_section(ReferenceParams, "reference", args.params)
    metrics = build_reference(args.images, args.out, params, shards_dir=args.shards)
    atomic_write_json(args.metrics, metrics)
    print(metrics)


if __name__ == "__main__":
    run_main(main)
