"""DVC stage `evaluate`: FID, KID, IS, precision/recall and class consistency of the samples, with their protocol.

    python stages/evaluate.py --params params.yaml --samples data/samples --reference data/reference \
        --model models/dit --metrics metrics/eval.json
"""
from __future__ import annotations

import argparse
import json

from pipeline.artifacts import atomic_write_json
from pipeline.config import load_section
from pipeline.metrics import EvaluateParams, evaluate_stage
from pipeline.tracking import TrackingParams, log_to_training_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--samples", required=True, help="sample stage output (dit-samples v1)")
    p.add_argument("--reference", required=True, help="reference stage output (dit-reference v1)")
    p.add_argument("--model", required=True, help="the DiT whose samples these are (model.json)")
    p.add_argument("--metrics", required=True, help="metrics JSON with the protocol beside the numbers")
    args = p.parse_args()

    params = load_section(EvaluateParams, "evaluate", args.params)
    tracking = load_section(TrackingParams, "tracking", args.params)
    result = evaluate_stage(args.samples, args.reference, args.model, params)
    atomic_write_json(args.metrics, result)
    numbers = {k: v for k, v in result.items() if k not in ("protocol", "notes")}
    log_to_training_run(tracking, args.model, numbers, "eval", artifacts={args.metrics: "eval"})
    print(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
