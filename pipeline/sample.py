"""The `sample` stage: seeded, resumable, Ray-distributed sampling of the trained DiT (the FID-50K protocol).

Protocol. `num_fid_samples` images from the EMA weights with the configured sampler, steps and guidance, decoded by
the VAE snapshot; labels `balanced` (i % num_classes) or `uniform` (random per sample, as the official
sample_ddp.py). The outputs: `samples.npz` (ADM's evaluator layout), `grid.png`, and `manifest.json` recording every
setting that determines the pixels, which the evaluate stage copies next to the FID.

Determinism. Sample i draws its label and all its noise from generators seeded by (seed, i) (`sample_seed`), and
the network and the VAE always run on blocks of `micro_batch` consecutive global indices, padded when a request
covers part of a block, so every call has the same shape and sample i sits at row i % micro_batch. CPU and GPU
matmul kernels are chosen by shape, so rows change in the last bits with the batch size (measured on CPU: the
(N, D) adaLN GEMMs differ by 1e-6 between N = 3 and 5; 25 DPM-Solver++ steps of DiT-Ti/2 drawn in batches of 3
or 5 differed by 3e-4 in the latents and in one uint8 pixel). Fixed shapes make the bytes independent of
batch_size, shard boundaries and the number of workers on one machine and library build (not across devices).
The seeding is ours, so the pixels differ from the official sample_ddp.py's; the distribution is the same.

Resume. Shard k covers indices [k * shard_size, (k + 1) * shard_size). Each finished shard is written atomically
to `shards/<key>/`, where key hashes everything that determines the pixels; a killed run skips finished shards,
and shards made under other settings, or by other code or package versions (`provenance.json` in the shard folder
records them), are moved aside to `superseded/` beside `shards/`, never deleted (pipeline/persisted.py).

Reproducing the paper's Table 2 (FID-50K 2.27 for DiT-XL/2 with cfg 1.5) from the official checkpoint, with
models/vae holding a save_pretrained snapshot of stabilityai/sd-vae-ft-ema:

    python -m pipeline.sample --official-ckpt DiT-XL-2-256x256.pt --model DiT-XL/2 --image-size 256 \\
        --vae models/vae --out data/samples_official --num-fid-samples 50000 --sampler ddpm --steps 250 \\
        --cfg-scale 1.5 --cfg-channels 3 --labels uniform --use-gpu true --num-workers 1

Settings not given on the command line come from the `sample` section of --params (values are parsed as YAML).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from pipeline.artifacts import atomic_write, require_file, sha256_dir, sha256_file
from pipeline.code_stamp import stamp
from pipeline.diffusion import DIT_DIFFUSION
from pipeline.formats.model_card import read_diffusion, read_model_card
from pipeline.formats.samples import save_npz, write_samples
from pipeline.generate import generate_images, load_models, make_grid, make_labels
from pipeline.model import DiT_models
from pipeline.params.load import ParamsError, from_dict, read_yaml
from pipeline.params.sample import SampleParams
from pipeline.persisted import open_keyed_dir, superseded_root
from pipeline.shared_storage import on_this_node, publish
from pipeline.timing import mark_ready

ACTOR_RESTARTS = 3  # restarts of each sampling actor, and retries of the shard it was drawing, after it is lost
SHARD_VERSION = 1  # bump when the shard layout or the seeding changes: shards of older versions become stale
OFFICIAL_NUM_CLASSES = 1000  # the official checkpoints are ImageNet-1k models


# --- the checkpoint ---------------------------------------------------------------------------------------------


def official_card(ckpt: str | Path, model: str, image_size: int, vae_dir: str | Path) -> dict:
    """The card of an official checkpoint, which carries no config: ImageNet classes, latent from the VAE."""
    if model not in DiT_models:
        raise ValueError(f"unknown model {model!r}; use one of {sorted(DiT_models)}")
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"official checkpoint {ckpt} not found (download DiT-XL-2-256x256.pt first)")
    vae_config = json.loads(require_file(Path(vae_dir) / "config.json", "vae").read_text())
    downsample = 2 ** (len(vae_config["block_out_channels"]) - 1)
    if image_size % downsample:
        raise ValueError(f"--image-size {image_size} is not a multiple of the VAE's downsample factor {downsample}")
    latent_shape = [vae_config["latent_channels"], image_size // downsample, image_size // downsample]
    with torch.device("meta"):  # only the constructor kwargs are wanted, not initialised weights
        net = DiT_models[model](
            input_size=latent_shape[1], in_channels=latent_shape[0], num_classes=OFFICIAL_NUM_CLASSES
        )
    return {
        "model": model,
        "model_kwargs": net.config,
        "latent_shape": latent_shape,
        "scaling_factor": None,
        "diffusion": {**DIT_DIFFUSION, "learn_sigma": net.config["learn_sigma"]},
        "num_classes": OFFICIAL_NUM_CLASSES,
        "class_names": None,
        "image_size": image_size,
        "checkpoint": str(ckpt),
        "checkpoint_sha256": sha256_file(ckpt),
    }


# --- shards -----------------------------------------------------------------------------------------------------


def settings_key(card: dict, vae_sha256: str, p: SampleParams) -> str:
    """Hash of everything that determines the pixels of a shard (not num_fid_samples: more samples extend a run)."""
    determining = {
        "shard_version": SHARD_VERSION,
        "micro_batch": p.micro_batch,
        "precision": p.precision,
        "compile": p.compile,
        "attention": p.attention,  # another kernel rounds differently
        "checkpoint_sha256": card["checkpoint_sha256"],
        "vae_sha256": vae_sha256,
        "latent_shape": list(card["latent_shape"]),
        "num_classes": card["num_classes"],
        "sampler": p.sampler,
        "steps": p.steps,
        "cfg_scale": p.cfg_scale,
        "cfg_channels": p.cfg_channels,
        "labels": p.labels,
        "seed": p.seed,
        "shard_size": p.shard_size,
    }
    return hashlib.sha256(json.dumps(determining, sort_keys=True).encode()).hexdigest()[:16]


def open_shard_dir(out_dir: Path, key: str, resume_across_versions: bool = False) -> Path:
    """`out_dir/shards/key`, ready to resume: shards of other settings, and of other code or packages (unless
    `resume_across_versions`), are moved aside to `out_dir/superseded/`, beside the persisted `shards/`, after
    checking that the disk holds a fresh set the size of the one moved; temp files of killed writes are removed."""
    shards = out_dir / "shards"
    return open_keyed_dir(
        shards,
        key,
        superseded_root(shards),
        "sample",
        stamp("sample"),
        resume_across_versions,
        need_bytes=lambda moved_bytes: moved_bytes,
    )


def shard_path(shard_dir: Path, k: int) -> Path:
    return shard_dir / f"shard-{k:05d}.npz"


def shard_indices(k: int, p: SampleParams) -> np.ndarray:
    return np.arange(k * p.shard_size, min((k + 1) * p.shard_size, p.num_fid_samples), dtype=np.int64)


def shard_is_done(path: Path, indices: np.ndarray) -> bool:
    """Finished, and for these indices (the last shard changes when num_fid_samples does)."""
    if not path.exists():
        return False
    with np.load(path) as f:
        return np.array_equal(f["indices"], indices)


class ShardWorker:
    """Loads the DiT and the VAE once, then turns shard ids into images; in-process or as a Ray actor."""

    def __init__(self, card: dict, vae_dir: str, p: SampleParams, device: str):
        if "checkpoint_location" in card:  # published by the driver (sample.storage_path): this node's copy
            card = {
                **card,
                "checkpoint": str(on_this_node(card["checkpoint_location"]) / Path(card["checkpoint"]).name),
            }
        self.model, self.vae = load_models(card, on_this_node(vae_dir), device)
        if p.compile:  # forward_with_cfg calls self.forward, so this covers guided sampling too
            self.model.forward = torch.compile(self.model.forward)
        self.card, self.p, self.device = card, p, device
        self.diffusion = read_diffusion(card, f"the model card of {card['checkpoint']}")

    def generate(self, k: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        mark_ready()
        p, card = self.p, self.card
        indices = shard_indices(k, p)
        labels = make_labels(p.labels, indices, card["num_classes"], p.seed)
        images = generate_images(
            self.model,
            self.vae,
            labels,
            indices,
            seed=p.seed,
            sampler=p.sampler,
            steps=p.steps,
            cfg_scale=p.cfg_scale,
            cfg_channels=p.cfg_channels,
            num_classes=card["num_classes"],
            latent_shape=tuple(card["latent_shape"]),
            device=self.device,
            batch_size=p.batch_size,
            micro_batch=p.micro_batch,
            precision=p.precision,
            diffusion=self.diffusion,
            attention=p.attention,
        )
        return k, images, labels, indices


def generate_shards(todo: list[int], card: dict, vae_dir: str, p: SampleParams) -> Iterator[tuple]:
    """Yield (k, images, labels, indices) for every shard id in `todo`, in completion order."""
    device = "cuda" if p.use_gpu else "cpu"
    if p.num_workers == 0:
        worker = ShardWorker(card, vae_dir, p, device)
        yield from (worker.generate(k) for k in todo)
        return
    import ray
    from ray.util import ActorPool

    from pipeline.cluster import init_ray

    init_ray()
    n, options = actor_plan(p, len(todo), ray.cluster_resources())
    if p.storage_path:  # the actors' nodes copy the weights and the VAE from storage, not from this file system
        card = {**card, "checkpoint_location": publish(card["checkpoint"], p.storage_path, "model")}
        vae_dir = publish(vae_dir, p.storage_path, "vae")
    # A lost actor (its process or node died) is restarted and its shard redone: a shard is written by the driver
    # only when it arrives whole, so no index goes missing or is written twice, and its pixels do not depend on
    # which actor drew it. The actors spread over the nodes: one per node first.
    actor = ray.remote(ShardWorker).options(
        **options, max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS, scheduling_strategy="SPREAD"
    )
    actors = [actor.remote(card, vae_dir, p, device) for _ in range(n)]
    try:
        yield from ActorPool(actors).map_unordered(lambda a, k: a.generate.remote(k), todo)
    finally:
        for a in actors:
            ray.kill(a)


def actor_plan(p: SampleParams, num_shards: int, resources: dict) -> tuple[int, dict]:
    """How many actors, with which resources: one per GPU with use_gpu, else num_workers single-CPU actors."""
    if p.use_gpu:
        gpus = int(resources.get("GPU", 0))
        if gpus == 0:
            raise ParamsError(
                "sample.use_gpu is true but the Ray cluster has no GPU; set sample.use_gpu: false "
                "or point RAY_ADDRESS at a cluster with GPUs"
            )
        return min(gpus, num_shards), {"num_gpus": 1, "num_cpus": 1}
    cpus = int(resources.get("CPU", 0))
    if p.num_workers > cpus:
        raise ParamsError(
            f"sample.num_workers={p.num_workers} CPU actors need as many CPUs; the Ray cluster has "
            f"{cpus}. Lower sample.num_workers"
        )
    return min(p.num_workers, num_shards), {"num_cpus": 1}


def read_shards(shard_dir: Path, p: SampleParams) -> tuple[np.ndarray, np.ndarray]:
    """All shards, in index order: uint8 (N, H, W, 3) and int64 (N,)."""
    images = labels = None
    for k in range(math.ceil(p.num_fid_samples / p.shard_size)):
        with np.load(shard_path(shard_dir, k)) as f:
            idx, shard_images = f["indices"], f["images"]
            if images is None:  # preallocated: 50K 256 px images are 9.8 GB, concatenating would double that
                images = np.empty((p.num_fid_samples, *shard_images.shape[1:]), np.uint8)
                labels = np.empty(p.num_fid_samples, np.int64)
            images[idx], labels[idx] = shard_images, f["labels"]
    return images, labels


# --- outputs ----------------------------------------------------------------------------------------------------


def with_row_names(grid: np.ndarray, names: list[str], row_height: int) -> np.ndarray:
    """The grid with a white left margin carrying each row's class name."""
    font = ImageFont.load_default()
    margin = 8 + int(max(font.getlength(n) for n in names))
    canvas = Image.new("RGB", (margin + grid.shape[1], grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for r, name in enumerate(names):
        draw.text((4, r * row_height + row_height // 2), name, fill="black", font=font, anchor="lm")
    return np.asarray(canvas)


def write_outputs(
    out_dir: Path, images: np.ndarray, labels: np.ndarray, card: dict, p: SampleParams, vae_sha256: str
) -> None:
    grid = make_grid(images, labels, card["num_classes"], p.grid_per_class)
    if card.get("class_names"):
        rows = grid.shape[0] // images.shape[1]
        grid = with_row_names(grid, card["class_names"][:rows], row_height=images.shape[1])
    atomic_write(out_dir / "grid.png", lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
    write_samples(
        out_dir,
        images,
        labels,
        sampler=p.sampler,
        steps=p.steps,
        cfg_scale=p.cfg_scale,
        cfg_channels=p.cfg_channels,
        labels=p.labels,
        seed=p.seed,
        image_size=int(images.shape[1]),
        latent_shape=list(card["latent_shape"]),
        model=card["model"],
        num_classes=card["num_classes"],
        class_names=card.get("class_names"),
        checkpoint_sha256=card["checkpoint_sha256"],
        vae_sha256=vae_sha256,
        micro_batch=p.micro_batch,
        precision=p.precision,
        shard_size=p.shard_size,
    )


def run_sample(
    p: SampleParams, card: dict, vae_dir: str | Path, out_dir: str | Path, resume_across_versions: bool = False
) -> dict:
    """Generate (or finish) the samples of `card` into `out_dir`; returns the throughput metrics. Finished shards of
    other pipeline code or package versions are regenerated, unless `resume_across_versions`."""
    out_dir, vae_dir = Path(out_dir), str(vae_dir)
    vae_sha256 = sha256_dir(require_file(vae_dir, "vae"))
    shard_dir = open_shard_dir(out_dir, settings_key(card, vae_sha256, p), resume_across_versions)
    shards = range(math.ceil(p.num_fid_samples / p.shard_size))
    todo = [k for k in shards if not shard_is_done(shard_path(shard_dir, k), shard_indices(k, p))]
    generated = sum(len(shard_indices(k, p)) for k in todo)
    start = time.perf_counter()
    with tqdm(total=p.num_fid_samples, initial=p.num_fid_samples - generated, unit="img", desc="sample") as bar:
        for k, images, labels, indices in generate_shards(todo, card, vae_dir, p) if todo else ():
            save_npz(shard_path(shard_dir, k), images=images, labels=labels, indices=indices)
            bar.update(len(indices))
    seconds = time.perf_counter() - start
    images, labels = read_shards(shard_dir, p)
    write_outputs(out_dir, images, labels, card, p, vae_sha256)
    img_per_s = generated / seconds if generated else None
    return {
        "num_samples": p.num_fid_samples,
        "num_generated": generated,
        "seconds": round(seconds, 3),
        "img_per_s": img_per_s,
        "img_steps_per_s": img_per_s * p.steps if img_per_s else None,
    }


# --- command line: sample any checkpoint, e.g. the official DiT-XL/2 ----------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, SampleParams]:
    ap = argparse.ArgumentParser(prog="python -m pipeline.sample", description=__doc__.split("\n\n")[0])
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--dit", help="a models/dit directory (ema.pt + model.json)")
    source.add_argument("--official-ckpt", help="an official checkpoint such as DiT-XL-2-256x256.pt")
    ap.add_argument("--model", help="with --official-ckpt: the preset, e.g. DiT-XL/2")
    ap.add_argument("--image-size", type=int, help="with --official-ckpt: pixels, e.g. 256")
    ap.add_argument("--vae", required=True, help="a diffusers save_pretrained VAE snapshot")
    ap.add_argument("--out", required=True)
    ap.add_argument("--metrics", help="also write the throughput metrics to this JSON file")
    ap.add_argument("--params", default="params.yaml", help="its `sample` section supplies unset settings")
    for field in dataclasses.fields(SampleParams):
        ap.add_argument(
            "--" + field.name.replace("_", "-"),
            type=yaml.safe_load,
            default=argparse.SUPPRESS,
            help=f"sample.{field.name} (YAML value)",
        )
    args = ap.parse_args(argv)
    if args.official_ckpt and (args.model is None or args.image_size is None):
        ap.error("--official-ckpt needs --model and --image-size (official checkpoints carry no config)")
    if args.dit and (args.model or args.image_size):
        ap.error("--dit reads the model from model.json; drop --model and --image-size")
    names = [f.name for f in dataclasses.fields(SampleParams)]
    base = read_yaml(args.params).get("sample", {}) if Path(args.params).exists() else {}
    given = {n: getattr(args, n) for n in names if hasattr(args, n)}
    return args, from_dict(SampleParams, {**base, **given}, "sample", source=f"{args.params} + command line")


def main(argv: list[str] | None = None) -> dict:
    from pipeline.artifacts import atomic_write_json

    args, p = parse_args(argv)
    card = (
        read_model_card(args.dit)
        if args.dit
        else official_card(args.official_ckpt, args.model, args.image_size, args.vae)
    )
    metrics = run_sample(p, card, args.vae, args.out)
    if args.metrics:
        atomic_write_json(args.metrics, metrics)
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    from pipeline.errors import run_main

    run_main(main)
