"""Replay a training from one of its checkpoints, in-process, and show where its loss spiked: the step, the examples
of that step's batch with the largest loss (timestep, label, eps MSE, vb term), and the timesteps at which the
network's noise prediction has blown up (every timestep and label scanned), just before that step's update.

    python bench/replay_spike.py models/checkpoints/ckpt-0003600.pt --to-step 3800

It reads params.yaml's train section and data/latents, as the train stage does, so run it in the checkout (or
experiment) whose run it replays. A run resumed from a checkpoint takes the same steps as the uninterrupted one
(pipeline/train.py: every random draw is a function of the seed, the step and the rank), so the spike comes back at
its step; a run of several workers is replayed as one, which draws other batches.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline.train as T  # noqa: E402
from pipeline.checkpoints import load_checkpoint  # noqa: E402
from pipeline.params.load import load_section  # noqa: E402
from pipeline.params.train import TrainParams  # noqa: E402


def per_example_terms(s: T.TrainState, data, step: int) -> dict:
    """Step `step`'s draws (as run_step makes them) and each example's loss terms, without an update."""
    torch.manual_seed(T.step_seed(s.params.seed, step, 0))
    x, y = data.batch(step, 0, 1, s.params.global_batch_size)
    t = T.draw_timesteps(s, x.shape[0], x.device)
    with torch.no_grad():
        terms = s.diffusion.training_losses(s.model, x, t, model_kwargs=dict(y=y))
    return {"t": t, "y": y, **{k: v for k, v in terms.items() if k in ("loss", "mse", "vb")}}


def blown_up(s: T.TrainState, data, threshold: float, timesteps: range | None = None) -> str:
    """The timesteps at which the median eps MSE over 8 latents is above `threshold` (healthy: below ~1) for some
    label (of `timesteps`, default all): each with how many labels and the largest of those medians."""
    torch.manual_seed(0)
    x = data.batch(0, 0, 1, s.params.global_batch_size)[0][:8]
    classes = s.model.config["num_classes"] + 1  # the null label of classifier-free guidance too
    found = []
    s.model.eval()
    with torch.no_grad():
        for step in timesteps or range(s.diffusion.num_timesteps):
            t = torch.full((8 * classes,), step)
            y = torch.arange(classes).repeat_interleave(8)
            noise = torch.randn(8 * classes, *x.shape[1:])
            eps = s.model(s.diffusion.q_sample(x.repeat(classes, 1, 1, 1), t, noise=noise), t, y)[:, : x.shape[1]]
            mse = ((eps - noise) ** 2).flatten(1).mean(1).view(classes, 8).median(1).values
            if (mse > threshold).any():
                found.append(f"t={step}: {int((mse > threshold).sum())} labels, up to {mse.max().item():.3g}")
    s.model.train()
    return "; ".join(found) or "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--to-step", type=int, required=True, help="replay up to this training step (1-based)")
    ap.add_argument("--spike", type=float, default=1.0, help="a step whose mean loss is above this is a spike")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--latents", type=Path, default=ROOT / "data" / "latents")
    args = ap.parse_args()

    p = replace(load_section(TrainParams, "train", args.params), num_workers=0, use_gpu=False, compile=False)
    ckpt = load_checkpoint(args.checkpoint)
    data, manifest = T.load_latent_batches(args.latents, p.seed, torch.device("cpu"))
    model = T.build_model(p, manifest["latent_shape"], manifest["num_classes"])
    s = T.make_train_state(model, p, torch.device("cpu"), 1, ckpt)
    print(f"at step {ckpt['step']}, the timesteps with a blown-up prediction: {blown_up(s, data, 10.0)}")
    for step in range(ckpt["step"], args.to_step):
        terms = per_example_terms(s, data, step)  # the step's own draws, scored before its update
        loss = terms["loss"].mean().item()
        if loss > args.spike:
            worst = terms["loss"].argsort(descending=True)[:4].tolist()
            print(f"step {step + 1}: loss {loss:.3g}; worst examples (t, label, eps MSE, vb):")
            for i in worst:
                t, y, mse, vb = terms["t"][i].item(), terms["y"][i].item(), terms["mse"][i], terms["vb"][i]
                print(f"    {t}, {y}, {mse:.3g}, {vb:.3g}")
            print(f"  the timesteps with a blown-up prediction before its update: {blown_up(s, data, 10.0)}")
        T.run_step(s, data, step, 0, 1)
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}: loss {loss:.3g}", flush=True)


if __name__ == "__main__":
    main()
