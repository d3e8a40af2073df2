"""The train stage's outputs besides checkpoints, written by rank 0: the CSV training log (plots/train.csv), the
MLflow run (metrics and EMA sample grids) and the progress bar; and the log's PNG (plots/train_loss.png), written by
the driver once training ends. MLflow stays a side channel: with tracking off the
tracker's calls do nothing, and the CSV and the checkpoints remain the record.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.artifacts import atomic_write
from pipeline.params.load import to_dict
from pipeline.params.tracking import TrackingParams
from pipeline.shared_storage import is_location, on_this_node
from pipeline.tracking import Tracker

LOG_COLUMNS = ("step", "loss", "mse", "vb", "grad_norm", "img_per_s")
# The PNG of the log (the CSV's offline view): the loss and its two terms (DiT Sec. 3.1: L_simple + L_vlb). Not
# img_per_s: measured time would make the image differ between two runs that trained the same weights.
PLOTTED_COLUMNS = ("loss", "mse", "vb")
# The EMA sample grid logged to MLflow: a monitoring aid, not an evaluation (that is the sample stage's job).
GRID_CLASSES, GRID_PER_CLASS, GRID_SEED = 8, 4, 0
GRID_SAMPLER, GRID_STEPS, GRID_CFG_SCALE = "dpm-solver++", 20, 4.0  # 4.0 = the official sample.py's default


class Reporter:
    """Rank 0's outputs besides checkpoints: the CSV training log, the MLflow run (metrics, EMA sample grids) and
    the progress bar. The log rows live in the checkpoints too, so a resumed run rewrites the CSV up to its step."""

    def __init__(self, config: dict, p, ckpt: dict | None, start: int, latent_shape, num_classes: int, diffusion: dict):
        self.rows = list(ckpt["log"]) if ckpt else []
        self.csv_path = Path(config["plots"]) if config["plots"] else None  # None: the driver writes it after
        if self.csv_path:
            atomic_write(self.csv_path, lambda tmp: tmp.write_text(csv_text(self.rows, header=True)))
        self.tracker = Tracker(TrackingParams(**config["tracking"]), ckpt["mlflow_run_id"] if ckpt else None)
        if self.tracker.run_id:
            self.tracker.resume(system_metrics=True)
        else:
            self.tracker.start(
                os.environ.get("DVC_EXP_NAME") or f"train {p.model}",
                {"train": to_dict(p), "model": config["model_config"]},
                config["tags"],
            )
        self.vae_dir, self.vae, self.latent_shape, self.num_classes = config["vae"], None, latent_shape, num_classes
        self.diffusion = diffusion
        self.vae_missing_said = False
        self.pbar = progress_bar(config["distributed"], p.train_steps, start)

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if self.csv_path:
            with open(self.csv_path, "a") as f:
                f.write(csv_text([row], header=False))
        self.tracker.log_metrics({f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])
        self.pbar.set_description(f"train loss {row['loss']:.4f}, {row['img_per_s']:.0f} img/s")

    def sample_grid(self, ema, step: int, device: torch.device, bf16: bool) -> None:
        """Log a grid of the EMA model's samples (GRID_PER_CLASS of each of the first GRID_CLASSES classes), drawn
        by the sample stage's generator: sample i from (GRID_SEED, i), one network block for the whole grid."""
        if not (self.tracker.enabled and self.vae_dir):
            return  # nowhere to log it, or no decoder
        reachable = is_location(self.vae_dir) or Path(self.vae_dir).is_dir()  # through storage, or a driver path
        if self.vae is None and not reachable:  # rank 0 on a node without the driver's files, no train.storage_path
            if not self.vae_missing_said:
                print(f"[train] no VAE at {self.vae_dir} on this node: the EMA sample grids are not logged to MLflow")
                self.vae_missing_said = True
            return
        from pipeline.autoencoder import load_vae
        from pipeline.generate import generate_images, make_grid

        self.vae = self.vae or load_vae(on_this_node(self.vae_dir), device)
        rows = min(self.num_classes, GRID_CLASSES)
        labels = np.repeat(np.arange(rows, dtype=np.int64), GRID_PER_CLASS)  # (n,)
        guidance = GRID_CFG_SCALE if ema.config["class_dropout_prob"] > 0 else 1.0  # guidance needs the null label
        images = generate_images(
            ema,
            self.vae,
            labels,
            np.arange(len(labels)),
            seed=GRID_SEED,
            sampler=GRID_SAMPLER,
            steps=GRID_STEPS,
            cfg_scale=guidance,
            cfg_channels=None,
            num_classes=self.num_classes,
            latent_shape=self.latent_shape,
            device=device,
            batch_size=len(labels),
            micro_batch=len(labels),
            precision="bf16" if bf16 else "fp32",
            diffusion=self.diffusion,
        )
        self.tracker.log_image(make_grid(images, labels, rows, GRID_PER_CLASS), key="ema_samples", step=step)

    def close(self, status: str) -> None:
        self.pbar.close()
        self.tracker.end(status)


def progress_bar(distributed: bool, total: int, initial: int):
    """tqdm in-process; Ray's tqdm in a Ray worker, whose log streaming would otherwise print every refresh."""
    if not distributed:
        return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
    from ray.experimental import tqdm_ray

    bar = tqdm_ray.tqdm(total=total, desc="train", unit="step")
    bar.n = initial
    bar.refresh()
    return bar


def write_log_plot(rows: list[dict], path: str | Path) -> None:
    """`path`: PLOTTED_COLUMNS of the log `rows` (each the mean over its log interval) over training steps, a PNG."""
    from pipeline.plots import line_plot  # the driver's alone: rank 0 imports this module, and needs no matplotlib

    line_plot(
        path,
        [row["step"] for row in rows],
        {k: [row[k] for row in rows] for k in PLOTTED_COLUMNS},
        title="Training loss",
        xlabel="training steps",
        ylabel="mean over the log interval",
        empty="no training log (train.official_checkpoint was imported)",
    )


def csv_text(rows: list[dict], header: bool) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
