"""DVC stage `train`: DiT on the VAE latents with Ray Train; resumes from the latest checkpoint when restarted.

    python stages/train.py --params params.yaml --latents data/latents --vae models/vae \
        --checkpoints models/checkpoints --out models/dit --metrics metrics/train.json --plots plots/train.csv \
        --plot-image plots/train_loss.png
"""

from __future__ import annotations

import argparse
import json

from pipeline.artifacts import remove_stale_temps
from pipeline.errors import run_main
from pipeline.params.load import load_section
from pipeline.params.train import TrainParams
from pipeline.tracking import load_tracking
from pipeline.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--latents", required=True, help="the encode stage's latents artifact")
    parser.add_argument("--vae", default=None, help="VAE snapshot for the EMA sample grids logged to MLflow")
    parser.add_argument("--checkpoints", required=True, help="persisted checkpoint directory (resumed from)")
    parser.add_argument("--out", required=True, help="output dir for ema.pt, model.json, tracking.json")
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--plots", required=True, help="CSV training log (step, loss, mse, vb, grad_norm, img_per_s)")
    parser.add_argument("--plot-image", default=None, help="PNG of the log's loss, mse and vb over steps")
    parser.add_argument(
        "--restart-on-mismatch",
        action="store_true",
        help="move checkpoints of another run (other params, model, latents, code or packages) "
        "aside to superseded/ beside --checkpoints (kept: `python -m pipeline.superseded`) and "
        "train from scratch, instead of stopping with an error",
    )
    parser.add_argument(
        "--resume-across-versions",
        action="store_true",
        help="resume a checkpoint made by other pipeline code or package versions (by default they "
        "count as another run)",
    )
    args = parser.parse_args()
    remove_stale_temps(args.checkpoints, args.out, args.metrics, args.plots)  # what a killed run left behind

    params = load_section(TrainParams, "train", args.params)
    tracking = load_tracking(args.params)
    metrics = train(
        params,
        tracking,
        latents_dir=args.latents,
        checkpoints_dir=args.checkpoints,
        out_dir=args.out,
        metrics_path=args.metrics,
        plots_path=args.plots,
        vae_dir=args.vae,
        restart_on_mismatch=args.restart_on_mismatch,
        resume_across_versions=args.resume_across_versions,
        plot_image_path=args.plot_image,
    )
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    run_main(main)
