"""DVC stage `ingest`: the configured image source -> ADM-cropped parquet shards (`dit-images` v1).

python stages/ingest.py --params params.yaml --out data/images --metrics metrics/ingest.json
"""

from __future__ import annotations

import argparse

from pipeline import ingest
from pipeline.artifacts import atomic_write_json, remove_stale_temps
from pipeline.errors import run_main
from pipeline.params.ingest import IngestParams
from pipeline.params.load import load_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file holding the `ingest` section")
    parser.add_argument("--out", required=True, help="output directory (owned by this stage)")
    parser.add_argument("--metrics", required=True, help="metrics JSON: count, skipped")
    args = parser.parse_args()
    remove_stale_temps(args.out, args.metrics)  # what a killed run left behind

    params = load_section(IngestParams, "ingest", args.params)
    metrics = ingest.ingest(params, args.out)
    atomic_write_json(args.metrics, metrics)


if __name__ == "__main__":
    run_main(main)
