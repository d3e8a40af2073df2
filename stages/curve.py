"""DVC stage `curve`: FID (and class consistency) of every kept training checkpoint, for FID-vs-steps curves.

    python -m stages.curve --params params.yaml --checkpoints models/checkpoints --reference data/reference \
        --vae models/vae --metrics metrics/curve.json --report reports/curve.json --plots plots/curve.csv \
        --plot-image plots/curve_fid.png
"""

from __future__ import annotations

import argparse
import json

from pipeline.artifacts import remove_stale_temps
from pipeline.curve import run_curve, write_outputs
from pipeline.errors import run_main
from pipeline.params.curve import CurveParams
from pipeline.params.evaluate import EvaluateParams
from pipeline.params.load import load_section
from pipeline.params.train import TrainParams
from pipeline.provenance import local_input
from pipeline.tracking import Tracker, load_tracking


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--checkpoints", required=True, help="the train stage's checkpoint directory")
    p.add_argument("--reference", required=True, help="reference stage output (dit-reference v1)")
    p.add_argument("--vae", required=True, help="the VAE snapshot that decodes the latents")
    p.add_argument("--metrics", required=True, help="metrics JSON: the last point, the model's Gflops and size")
    p.add_argument("--report", required=True, help="JSON: every point, the model, the protocol")
    p.add_argument("--plots", required=True, help="CSV: step, fid, class_consistency, kid")
    p.add_argument("--plot-image", default=None, help="PNG: FID over training steps")
    args = p.parse_args()
    remove_stale_temps(args.metrics, args.report, args.plots)  # what a killed run left behind

    params = load_section(CurveParams, "curve", args.params)
    evaluation = load_section(EvaluateParams, "evaluate", args.params)
    train = load_section(TrainParams, "train", args.params)
    tracking = load_tracking(args.params)
    record = run_curve(
        params, evaluation, args.checkpoints, args.reference, args.vae, local_input(train.official_checkpoint)
    )
    write_outputs(record, args.metrics, args.report, args.plots, args.plot_image)
    if record["steps"] and record["mlflow_run_id"]:  # the side channel: the curve in the training's MLflow run
        tracker = Tracker(tracking, record["mlflow_run_id"])
        tracker.resume()
        for i, step in enumerate(record["steps"]):
            tracker.log_metrics(
                {"curve/fid": record["fid"][i], "curve/class_consistency": record["class_consistency"][i]}, step=step
            )
        tracker.end()
    print(json.dumps({k: record[k] for k in ("model", "steps", "fid", "gflops", "params_M")}))


if __name__ == "__main__":
    run_main(main)
