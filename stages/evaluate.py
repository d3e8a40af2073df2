"""Stage `evaluate`: FID, KID, IS, precision/recall and class consistency of the samples, with their protocol."""
from __future__ import annotations

import argparse
import json

from pipeline.artifacts import atomic_write_json
from pipeline.config import load_section
from pipeline.metrics import EvaluateParams, evaluate_stage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--samples", default="data/samples", help="sample stage output (dit-samples v1)")
    p.add_argument("--reference", default="data/reference", help="reference stage output (dit-reference v1)")
    p.add_argument("--model", default="models/dit", help="the DiT whose samples these are (model.json)")
    p.add_argument("--metrics", default="metrics/eval.json")
    args = p.parse_args()

    params = load_section(EvaluateParams, "evaluate", args.params)
    result = evaluate_stage(args.samples, args.reference, args.model, params)
    atomic_write_json(args.metrics, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("protocol", "notes")}, indent=2))


if __name__ == "__main__":
    main()
