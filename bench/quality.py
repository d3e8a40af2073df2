"""The offline default's quality bar, measured on the pipeline's own outputs (run `dvc repro` first).

Prints, for one seeded set of conditional samples scored with the reference stage's extractor:
- the trained EMA model with the sample stage's sampler (params.yaml `sample`), i.e. the metrics/eval.json setting;
- the same architecture untrained (seeded init), the baseline of the bar "FID at most 0.5x the untrained FID";
- the VAE's reconstructions of as many real images (their posterior mean decoded): the ceiling any DiT on these
  latents can reach;
- optionally the paper's sampler, 250 DDPM steps, and 25 DPM-Solver++ steps on the trained model (`--ddpm250`:
  slow on a CPU).

    python bench/quality.py                      # the default number of samples (sample.num_fid_samples)
    python bench/quality.py --num-samples 400 --ddpm250

FID at a small N is biased upward: compare rows of one run (same N, labels and noise), not with other N.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from pipeline.features import load_extractor
from pipeline.formats.images import read_images
from pipeline.formats.model_card import read_diffusion, read_model_card
from pipeline.formats.reference_stats import load_reference
from pipeline.generate import generate_images, load_models, make_labels
from pipeline.metrics import evaluate_images
from pipeline.model import DiT
from pipeline.params.evaluate import EvaluateParams
from pipeline.params.load import load_section
from pipeline.params.sample import SampleParams
from pipeline.vae import reconstruct

BAR_FID_RATIO = 0.5
BAR_CLASS_CONSISTENCY = 0.60


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--dit", default="models/dit")
    ap.add_argument("--vae", default="models/vae")
    ap.add_argument("--reference", default="data/reference")
    ap.add_argument("--images", default="data/images", help="the real images, for the VAE-reconstruction ceiling")
    ap.add_argument("--num-samples", type=int, default=None, help="default: sample.num_fid_samples")
    ap.add_argument("--ddpm250", action="store_true", help="also sample with 250 DDPM steps (the paper's sampler)")
    args = ap.parse_args()

    sp = load_section(SampleParams, "sample", args.params)
    ev = load_section(EvaluateParams, "evaluate", args.params)
    n = args.num_samples or sp.num_fid_samples
    card = read_model_card(args.dit)
    trained, vae = load_models(card, args.vae, "cpu")
    torch.manual_seed(0)
    untrained = DiT.from_config(card["model_kwargs"]).eval()
    reference, extractor = load_reference(args.reference), load_extractor(args.reference, "cpu")
    num_classes = card["model_kwargs"]["num_classes"]
    indices = np.arange(n, dtype=np.int64)
    labels = make_labels(sp.labels, indices, num_classes, sp.seed)

    runs = [("untrained", untrained, sp.sampler, sp.steps), ("trained", trained, sp.sampler, sp.steps)]
    if args.ddpm250:  # the comparison that matters: 25 DPM-Solver++ steps against the paper's 250 DDPM steps
        if (sp.sampler, sp.steps) != ("dpm-solver++", 25):
            runs.append(("trained", trained, "dpm-solver++", 25))
        runs.append(("trained", trained, "ddpm", 250))
    rows = []
    real, real_labels, _ = read_images(args.images)
    pick = np.concatenate([np.flatnonzero(real_labels == c)[: -(-n // num_classes)] for c in range(num_classes)])[:n]
    m = evaluate_images(
        reconstruct(vae, real[pick], sp.micro_batch).numpy(), real_labels[pick], reference, extractor, ev
    )
    rows.append(
        {
            "model": "vae reconstruction of real images (ceiling)",
            "num_samples": len(pick),
            "fid": round(m["fid"], 2),
            "class_consistency": m["class_consistency"],
        }
    )
    print(json.dumps(rows[-1]), flush=True)
    for name, model, sampler, steps in runs:
        t0 = time.perf_counter()
        images = generate_images(
            model,
            vae,
            labels,
            indices,
            seed=sp.seed,
            sampler=sampler,
            steps=steps,
            cfg_scale=sp.cfg_scale,
            cfg_channels=sp.cfg_channels,
            num_classes=num_classes,
            latent_shape=tuple(card["latent_shape"]),
            device="cpu",
            batch_size=sp.batch_size,
            micro_batch=sp.micro_batch,
            precision="fp32",
            diffusion=read_diffusion(card, f"{args.dit}/model.json"),
        )
        m = evaluate_images(images, labels, reference, extractor, ev)
        rows.append(
            {
                "model": name,
                "sampler": f"{sampler}-{steps}",
                "cfg_scale": sp.cfg_scale,
                "num_samples": n,
                "fid": round(m["fid"], 2),
                "class_consistency": m["class_consistency"],
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    untrained_row, trained_row = rows[1], rows[2]
    ratio = trained_row["fid"] / untrained_row["fid"]
    cc = trained_row["class_consistency"]
    print(
        f"FID trained / untrained = {trained_row['fid']:.2f} / {untrained_row['fid']:.2f} = {ratio:.3f} "
        f"(bar <= {BAR_FID_RATIO}: {'met' if ratio <= BAR_FID_RATIO else 'NOT met'})"
    )
    if cc is not None:
        print(
            f"class consistency at cfg {sp.cfg_scale} = {cc:.3f} "
            f"(bar >= {BAR_CLASS_CONSISTENCY}: {'met' if cc >= BAR_CLASS_CONSISTENCY else 'NOT met'})"
        )


if __name__ == "__main__":
    main()
