"""DVC stage `evaluate`: FID, KID, IS, precision/recall and class consistency of the samples, with their protocol.

    python -m stages.evaluate --params params.yaml --samples data/samples --reference data/reference \
        --model models/dit --metrics metrics/eval.json --report reports/eval.json
"""

from __future__ import annotations

import argparse
import json

from pipeline.artifacts import atomic_write_json, remove_stale_temps
from pipeline.errors import run_main
from pipeline.evaluate import evaluate_stage, split_evaluation
from pipeline.params.evaluate import EvaluateParams
from pipeline.params.load import load_section
from pipeline.tracking import load_tracking, log_to_training_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--samples", required=True, help="sample stage output (dit-samples v1)")
    p.add_argument("--reference", required=True, help="reference stage output (dit-reference v1)")
    p.add_argument("--model", required=True, help="the DiT whose samples these are (model.json)")
    p.add_argument("--metrics", required=True, help="metrics JSON: the numbers only")
    p.add_argument("--report", required=True, help="JSON: the protocol of those numbers, and why any is absent")
    args = p.parse_args()
    remove_stale_temps(args.metrics, args.report)  # what a killed run left behind

    params = load_section(EvaluateParams, "evaluate", args.params)
    tracking = load_tracking(args.params)
    numbers, report = split_evaluation(evaluate_stage(args.samples, args.reference, args.model, params))
    atomic_write_json(args.metrics, numbers)
    atomic_write_json(args.report, report)
    log_to_training_run(
        tracking, args.model, numbers, "eval", artifacts={args.metrics: "eval/metrics", args.report: "eval/report"}
    )
    print(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    run_main(main)
