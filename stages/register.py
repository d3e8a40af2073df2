"""DVC stage `register`: the evaluated DiT as an MLflow pyfunc model version; `champion` moves only on a better score
under the same evaluation protocol. With tracking.enabled false it registers nothing and records why.

    python -m stages.register --params params.yaml --dit models/dit --vae models/vae --eval metrics/eval.json \
        --eval-report reports/eval.json --images data/images --latents data/latents --report reports/register.json
"""

from __future__ import annotations

import argparse
import json

from pipeline.artifacts import remove_stale_temps
from pipeline.errors import run_main
from pipeline.params.load import load_section
from pipeline.params.register import RegisterParams
from pipeline.params.sample import SampleParams
from pipeline.pyfunc import SAMPLER_KEYS
from pipeline.register import register
from pipeline.tracking import load_tracking


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dit", required=True, help="the train stage's models/dit (ema.pt, model.json, tracking.json)")
    parser.add_argument("--vae", required=True, help="the vae stage's save_pretrained snapshot")
    parser.add_argument("--eval", required=True, help="the evaluate stage's numbers (metrics/eval.json)")
    parser.add_argument("--eval-report", required=True, help="their protocol (reports/eval.json)")
    parser.add_argument("--images", required=True, help="the ingest stage's data/images (its manifest is hashed)")
    parser.add_argument("--latents", required=True, help="the encode stage's data/latents (its manifest is hashed)")
    parser.add_argument("--report", required=True, help="the decision and its reason, as JSON")
    args = parser.parse_args()
    remove_stale_temps(args.report)  # what a killed run left behind

    params = load_section(RegisterParams, "register", args.params)
    tracking = load_tracking(args.params)
    sample = load_section(SampleParams, "sample", args.params)
    sampler_defaults = {k: getattr(sample, k) for k in SAMPLER_KEYS}  # the pyfunc's predict() defaults
    result = register(
        params,
        tracking,
        dit_dir=args.dit,
        vae_dir=args.vae,
        eval_path=args.eval,
        eval_report=args.eval_report,
        images_dir=args.images,
        latents_dir=args.latents,
        sampler_defaults=sampler_defaults,
        out_report=args.report,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_main(main)
