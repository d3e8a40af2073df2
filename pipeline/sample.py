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
and shards made under other settings are deleted.

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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from pipeline.artifacts import (ArtifactError, atomic_write, require_file, sha256_dir, sha256_file,
                                write_manifest)
from pipeline.config import ParamsError, from_dict, read_yaml
from pipeline.diffusion import sample as diffusion_sample
from pipeline.model import DiT, DiT_models
from pipeline.vae import decode_latents, load_vae

FORMAT, VERSION = "dit-samples", 1
SHARD_VERSION = 1  # bump when the shard layout or the seeding changes: shards of older versions become stale
GRID_MAX_CLASSES = 32  # display only: 1000 rows of 256 px images would make a 256k-pixel-tall PNG
OFFICIAL_NUM_CLASSES = 1000  # the official checkpoints are ImageNet-1k models
CARD_KEYS = ("model", "model_kwargs", "latent_shape", "scaling_factor", "num_classes")


@dataclass(frozen=True)
class SampleParams:
    num_fid_samples: int  # paper: 50,000
    sampler: Literal["ddpm", "ddim", "dpm-solver++"]
    steps: int
    cfg_scale: float  # 1.0 = no guidance
    cfg_channels: int | None  # None = guide all eps channels; 3 = the official sampler
    labels: Literal["balanced", "uniform"]
    batch_size: int  # images per sampler loop, rounded up to whole micro-batches; does not change pixels
    micro_batch: int  # images per network/VAE call (2x rows with guidance); fixes the pixels, see the docstring
    precision: Literal["fp32", "bf16"]  # the DiT under bf16 autocast (GPUs); the VAE always decodes in fp32
    compile: bool  # torch.compile the DiT's forward (one shape per run, thanks to the fixed micro-batch)
    num_workers: int  # Ray CPU actors; 0 = in-process (with use_gpu, one actor per GPU of the cluster)
    use_gpu: bool
    shard_size: int  # images per resumable shard
    seed: int
    grid_per_class: int


def check_params(p: SampleParams) -> None:
    for name in ("num_fid_samples", "steps", "batch_size", "micro_batch", "shard_size", "grid_per_class"):
        if getattr(p, name) < 1:
            raise ParamsError(f"sample.{name} must be >= 1, got {getattr(p, name)}")
    if p.num_workers < 0:
        raise ParamsError(f"sample.num_workers must be >= 0 (0 = in-process), got {p.num_workers}")
    if p.shard_size % p.micro_batch:
        raise ParamsError(f"sample.shard_size={p.shard_size} must be a multiple of sample.micro_batch="
                           f"{p.micro_batch} (the fixed network batch) so that shards do not split a block")


# --- seeds and labels -------------------------------------------------------------------------------------------

def sample_seed(seed: int, index: int, stream: str) -> int:
    """63-bit generator seed of sample `index`'s `stream` ("noise" or "label"): a hash, so unlike seed * K + i no
    two (seed, index) pairs can collide, and the label draw never shifts the noise stream."""
    digest = hashlib.sha256(f"dit-sample/{stream}/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generators(seed: int, indices: np.ndarray, stream: str) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(sample_seed(seed, int(i), stream)) for i in indices]


def make_labels(mode: str, indices: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """int64 (N,) class of each global index: balanced = i % num_classes, uniform = a seeded draw per index."""
    if mode == "balanced":
        return (np.asarray(indices) % num_classes).astype(np.int64)
    if mode == "uniform":
        draws = [torch.randint(num_classes, (1,), generator=g) for g in generators(seed, indices, "label")]
        return torch.cat(draws).numpy().astype(np.int64) if draws else np.zeros(0, np.int64)
    raise ValueError(f"unknown labels mode {mode!r}; use 'balanced' or 'uniform'")


# --- the checkpoint ---------------------------------------------------------------------------------------------

def read_model_card(dit_dir: str | Path) -> dict:
    """models/dit/model.json plus the EMA path and its verified sha256."""
    dit_dir = Path(dit_dir)
    card = json.loads(require_file(dit_dir / "model.json", "train").read_text())
    missing = [k for k in CARD_KEYS if k not in card]
    if missing:
        raise ArtifactError(f"{dit_dir}/model.json lacks {missing}; run `dvc repro train`")
    ema = require_file(dit_dir / "ema.pt", "train")
    sha = sha256_file(ema)
    if card.get("ema_sha256") not in (None, sha):
        raise ArtifactError(f"{ema} (sha256 {sha[:12]}) is not the file model.json describes "
                            f"({card['ema_sha256'][:12]}); run `dvc repro train`")
    return {**card, "checkpoint": str(ema), "checkpoint_sha256": sha}


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
        net = DiT_models[model](input_size=latent_shape[1], in_channels=latent_shape[0],
                                num_classes=OFFICIAL_NUM_CLASSES)
    return {"model": model, "model_kwargs": net.config, "latent_shape": latent_shape, "scaling_factor": None,
            "num_classes": OFFICIAL_NUM_CLASSES, "class_names": None, "image_size": image_size,
            "checkpoint": str(ckpt), "checkpoint_sha256": sha256_file(ckpt)}


def build_dit(card: dict, device) -> DiT:
    """The model rebuilt from the card's own config, EMA weights loaded strictly, in eval mode."""
    model = DiT.from_config(card["model_kwargs"])
    state = torch.load(card["checkpoint"], map_location="cpu", weights_only=True)
    if isinstance(state.get("ema"), dict):  # a training checkpoint (official train.py or ours): take its EMA
        state = state["ema"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{card['checkpoint']} does not fit {card['model']} {card['model_kwargs']} (for an "
                            f"official checkpoint, check --model and --image-size): {e}") from e
    return model.to(device).eval()


def load_dit(dit_dir: str | Path, device) -> tuple[DiT, dict]:
    card = read_model_card(dit_dir)
    return build_dit(card, device), card


def load_models(card: dict, vae_dir: str | Path, device):
    """(DiT, VAE) on `device`; checks that the model was trained on latents of this VAE's scale."""
    model, vae = build_dit(card, device), load_vae(vae_dir, device)
    trained_scale = card["scaling_factor"]
    if trained_scale is not None and not math.isclose(trained_scale, vae.config.scaling_factor, rel_tol=1e-6):
        raise ArtifactError(f"the DiT was trained on latents scaled by {trained_scale} but {vae_dir} has "
                            f"scaling_factor {vae.config.scaling_factor}; run `dvc repro encode train`")
    return model, vae


# --- generation -------------------------------------------------------------------------------------------------

class FixedShapeNet:
    """The DiT as the sampler sees it, run on blocks of exactly `rows` rows whatever the batch, so that every
    network call has one shape. The sampler's inputs are whole blocks; with guidance they are [cond; uncond]
    (official layout) and each block's cond rows go with its own uncond rows."""

    training = False

    def __init__(self, model: DiT, rows: int):
        self.model, self.rows = model, rows

    def __call__(self, x, t, y):  # (N, C, H, W), (N,), (N,) -> (N, 2C, H, W)
        r = self.rows
        return torch.cat([self.model(x[s:s + r], t[s:s + r], y[s:s + r]) for s in range(0, len(x), r)])

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels):  # x (2N, C, H, W) = [cond; uncond]
        n, r = len(x) // 2, self.rows
        outs = []
        for s in range(0, n, r):
            pair = [torch.cat([v[s:s + r], v[n + s:n + s + r]]) for v in (x, t, y)]
            outs.append(self.model.forward_with_cfg(*pair, cfg_scale=cfg_scale, cfg_channels=cfg_channels))
        return torch.cat([o[:r] for o in outs] + [o[r:] for o in outs])


def generate_images(model, vae, labels: np.ndarray, indices: np.ndarray, *, seed: int, sampler: str, steps: int,
                    cfg_scale: float, cfg_channels: int | None, num_classes: int, latent_shape: tuple, device,
                    batch_size: int, micro_batch: int, precision: str, progress: bool = False) -> np.ndarray:
    """uint8 (N, H, W, 3) images of global samples `indices` (N,) with classes `labels` (N,).

    Image i depends only on (seed, indices[i], labels[i]) and the sampling settings, never on N, on batch_size
    or on which worker made it, for a given `micro_batch` (see the module docstring). `batch_size` images share
    one sampler loop."""
    labels, indices = np.asarray(labels, dtype=np.int64), np.asarray(indices, dtype=np.int64)
    if labels.shape != indices.shape or labels.ndim != 1 or len(np.unique(indices)) != len(indices):
        raise ValueError(f"labels and indices must be 1-D of one length with distinct indices, got "
                         f"{labels.shape} and {indices.shape}")
    if batch_size < 1 or (indices < 0).any():
        raise ValueError(f"need batch_size >= 1 (got {batch_size}) and indices >= 0")
    wanted = dict(zip(indices.tolist(), labels.tolist()))
    blocks = np.unique(indices // micro_batch)
    per_loop = math.ceil(batch_size / micro_batch)
    net, found = FixedShapeNet(model, micro_batch), {}
    for start in tqdm(range(0, len(blocks), per_loop), desc="batches", disable=not progress):
        rows = (blocks[start:start + per_loop, None] * micro_batch + np.arange(micro_batch)).reshape(-1)
        y = torch.tensor([wanted.get(i, 0) for i in rows.tolist()])  # rows nobody asked for are padding
        bf16 = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
        with torch.inference_mode():
            with bf16:
                z = diffusion_sample(net, sampler=sampler, steps=steps, shape=(len(rows), *latent_shape), y=y,
                                     cfg_scale=cfg_scale, cfg_channels=cfg_channels,
                                     generators=generators(seed, rows, "noise"), num_classes=num_classes,
                                     device=device)
            images = torch.cat([decode_latents(vae, block) for block in z.split(micro_batch)]).numpy()
        found.update((i, image) for i, image in zip(rows.tolist(), images) if i in wanted)
    if not len(indices):
        return np.zeros((0, 0, 0, 3), np.uint8)
    return np.stack([found[i] for i in indices.tolist()])


# --- shards -----------------------------------------------------------------------------------------------------

def settings_key(card: dict, vae_sha256: str, p: SampleParams) -> str:
    """Hash of everything that determines the pixels of a shard (not num_fid_samples: more samples extend a run)."""
    determining = {
        "shard_version": SHARD_VERSION, "micro_batch": p.micro_batch, "precision": p.precision, "compile": p.compile,
        "checkpoint_sha256": card["checkpoint_sha256"],
        "vae_sha256": vae_sha256, "latent_shape": list(card["latent_shape"]), "num_classes": card["num_classes"],
        "sampler": p.sampler, "steps": p.steps, "cfg_scale": p.cfg_scale, "cfg_channels": p.cfg_channels,
        "labels": p.labels, "seed": p.seed, "shard_size": p.shard_size,
    }
    return hashlib.sha256(json.dumps(determining, sort_keys=True).encode()).hexdigest()[:16]


def open_shard_dir(out_dir: Path, key: str) -> Path:
    """`out_dir/shards/key`, after deleting shards of other settings and temp files of killed writes."""
    root = out_dir / "shards"
    for stale in root.iterdir() if root.is_dir() else ():
        if stale.name != key:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    (root / key).mkdir(parents=True, exist_ok=True)
    for tmp in (root / key).glob(".*.tmp"):
        tmp.unlink()
    return root / key


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


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    """Atomic, uncompressed np.savez (ADM's evaluator reads samples.npz's arr_0 this way)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: given a path, np.savez would append ".npz" to the temp name
            np.savez(f, **arrays)
    return atomic_write(path, write)


class ShardWorker:
    """Loads the DiT and the VAE once, then turns shard ids into images; in-process or as a Ray actor."""

    def __init__(self, card: dict, vae_dir: str, p: SampleParams, device: str):
        self.model, self.vae = load_models(card, vae_dir, device)
        if p.compile:  # forward_with_cfg calls self.forward, so this covers guided sampling too
            self.model.forward = torch.compile(self.model.forward)
        self.card, self.p, self.device = card, p, device

    def generate(self, k: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        p, card = self.p, self.card
        indices = shard_indices(k, p)
        labels = make_labels(p.labels, indices, card["num_classes"], p.seed)
        images = generate_images(self.model, self.vae, labels, indices, seed=p.seed, sampler=p.sampler,
                                 steps=p.steps, cfg_scale=p.cfg_scale, cfg_channels=p.cfg_channels,
                                 num_classes=card["num_classes"], latent_shape=tuple(card["latent_shape"]),
                                 device=self.device, batch_size=p.batch_size, micro_batch=p.micro_batch,
                                 precision=p.precision)
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
    actor = ray.remote(ShardWorker).options(**options)
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
            raise ParamsError("sample.use_gpu is true but the Ray cluster has no GPU; set sample.use_gpu: false "
                              "or point RAY_ADDRESS at a cluster with GPUs")
        return min(gpus, num_shards), {"num_gpus": 1, "num_cpus": 1}
    cpus = int(resources.get("CPU", 0))
    if p.num_workers > cpus:
        raise ParamsError(f"sample.num_workers={p.num_workers} CPU actors need as many CPUs; the Ray cluster has "
                          f"{cpus}. Lower sample.num_workers")
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

def make_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
    """uint8 (rows * H, per_class * W, 3): row c holds the first `per_class` samples of class c in index order,
    black where a class has fewer; rows = min(num_classes, GRID_MAX_CLASSES)."""
    rows, (h, w) = min(num_classes, GRID_MAX_CLASSES), images.shape[1:3]
    grid = np.zeros((rows, per_class, h, w, 3), np.uint8)
    for c in range(rows):
        picked = np.flatnonzero(labels == c)[:per_class]
        grid[c, : len(picked)] = images[picked]
    return grid.transpose(0, 2, 1, 3, 4).reshape(rows * h, per_class * w, 3)


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


def write_outputs(out_dir: Path, images: np.ndarray, labels: np.ndarray, card: dict, p: SampleParams,
                  vae_sha256: str) -> None:
    save_npz(out_dir / "samples.npz", arr_0=images, labels=labels)
    grid = make_grid(images, labels, card["num_classes"], p.grid_per_class)
    if card.get("class_names"):
        rows = grid.shape[0] // images.shape[1]
        grid = with_row_names(grid, card["class_names"][:rows], row_height=images.shape[1])
    atomic_write(out_dir / "grid.png", lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
    write_manifest(
        out_dir, FORMAT, VERSION, num_samples=len(images), sampler=p.sampler, steps=p.steps,
        cfg_scale=p.cfg_scale, cfg_channels=p.cfg_channels, labels=p.labels, seed=p.seed,
        image_size=int(images.shape[1]), latent_shape=list(card["latent_shape"]), model=card["model"],
        num_classes=card["num_classes"], class_names=card.get("class_names"),
        checkpoint_sha256=card["checkpoint_sha256"], vae_sha256=vae_sha256, micro_batch=p.micro_batch, precision=p.precision,
        shard_size=p.shard_size, samples_sha256=sha256_file(out_dir / "samples.npz"),
        label_counts=np.bincount(labels, minlength=card["num_classes"]).tolist(),
    )


def run_sample(p: SampleParams, card: dict, vae_dir: str | Path, out_dir: str | Path) -> dict:
    """Generate (or finish) the samples of `card` into `out_dir`; returns the throughput metrics."""
    check_params(p)
    out_dir, vae_dir = Path(out_dir), str(vae_dir)
    vae_sha256 = sha256_dir(require_file(vae_dir, "vae"))
    shard_dir = open_shard_dir(out_dir, settings_key(card, vae_sha256, p))
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
    return {"num_samples": p.num_fid_samples, "num_generated": generated, "seconds": round(seconds, 3),
            "img_per_s": img_per_s, "img_steps_per_s": img_per_s * p.steps if img_per_s else None}


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
        ap.add_argument("--" + field.name.replace("_", "-"), type=yaml.safe_load, default=argparse.SUPPRESS,
                        help=f"sample.{field.name} (YAML value)")
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
    card = (read_model_card(args.dit) if args.dit
            else official_card(args.official_ckpt, args.model, args.image_size, args.vae))
    metrics = run_sample(p, card, args.vae, args.out)
    if args.metrics:
        atomic_write_json(args.metrics, metrics)
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    from pipeline.errors import run_main

    run_main(main)
