"""The `train` stage: DiT training (Peebles & Xie 2023, Sec. 4) as a Ray Train DDP loop that resumes exactly.

What the official train.py lacks and this loop adds:
- exact resume: the data order is a permutation seeded by (seed, epoch), and every other random draw of a step
  (posterior sample, flip, timesteps, noise, label dropout inside the model) comes from the global torch RNG
  re-seeded from (seed, step, rank) before the step, so a run killed at any point and restarted from its latest
  checkpoint ends with the same EMA weights (bit for bit in-process on the CPU; measured bit for bit through Ray
  with 2 gloo workers too). The RNG states are saved and restored as well, for anything outside the step;
- DDP on the worker's *local* device (the official `device_ids=[rank]` uses the global rank and breaks across
  nodes), bf16 autocast, torch.compile, fused AdamW, a NaN guard that never checkpoints a diverged state.

`train_loop_per_worker(config)` is the loop: Ray Train's TorchTrainer runs it on `num_workers` workers, or it runs
in-process (num_workers 0). Checkpoints go to models/checkpoints (a local disk on one machine, a shared file system
on a cluster), or with `train.storage_path` through Ray Train's persistent storage (S3 or a shared directory:
pipeline/checkpoint_storage.py); with it the latents and the VAE reach each node through that storage too, copied
once per node (pipeline/shared_storage.py), so no worker reads the driver's file system. Each worker
memory-maps the latents, so a node holds one copy of them in its page cache whatever its number of workers. A lost
worker makes Ray Train restart the group from the latest checkpoint. Only rank 0 writes checkpoints, the CSV log,
MLflow records and the progress bar. The driver, `train(...)`, exports the EMA.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts import (
    ArtifactError,
    atomic_write,
    atomic_write_json,
    require_file,
    sha256_file,
)
from pipeline.attention import attention_backend
from pipeline.checkpoint_storage import LocalCheckpoints, fill_local, seed_run, worker_store
from pipeline.checkpoints import (
    CHECKPOINT_FORMAT,
    capture_rng,
    check_resumable,
    latest_checkpoint,
    list_checkpoints,
    restore_rng,
    resume_mismatch,
)
from pipeline.code_stamp import stamp
from pipeline.determinism import seed_everything
from pipeline.diffusion import DIT_DIFFUSION, create_diffusion
from pipeline.formats.latents import LatentSet, open_latents, read_latents_manifest
from pipeline.formats.model_card import write_model_card
from pipeline.fp8 import convert_to_fp8
from pipeline.model import DiT, DiT_models
from pipeline.numerics import set_float32_mode
from pipeline.params.load import from_dict, to_dict
from pipeline.params.tracking import TrackingParams
from pipeline.params.train import TrainParams, check_batch_fits
from pipeline.persisted import check_free_space, move_checkpoints_aside, run_name, superseded_root
from pipeline.provenance import local_input
from pipeline.shared_storage import on_this_node, publish
from pipeline.timing import mark_ready
from pipeline.tracking import Tracker, public_uri, run_tags, use_recorded_store
from pipeline.train_log import Reporter, csv_text, write_log_plot

LATENTS_GPU_FRACTION = 0.25  # keep the latents on the GPU when they take at most this share of its free memory
# A lost worker (its process or node died) makes Ray Train restart the whole group, which resumes from the latest
# checkpoint with the same bytes as an uninterrupted run. An error of the loop itself (a NaN loss, a checkpoint of
# another run) is retried as well, since Ray cannot tell them apart, and fails again each time: a bounded cost.
WORKER_GROUP_RESTARTS = 3


# --- randomness ---------------------------------------------------------------------------------------------------


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of everything rank `rank` draws at 0-based step `step` (SeedSequence mixes the three well)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)


# --- data ---------------------------------------------------------------------------------------------------------


class LatentBatches:
    """The latents artifact as training batches: x (b, C, h, w) float32, scaled, and y (b,) int64, on `device`.

    Global batch i of an epoch is slice i of that epoch's permutation (seeded by (seed, epoch); the last partial
    batch is dropped, as the official DataLoader's drop_last), and rank r takes the r-th of its `world` equal parts,
    so the workers' examples are disjoint. Each step picks a random flip of every example and, for a stored
    posterior, samples it: x = (mean + std * eps) * scaling_factor; both from the step's seeded RNG.

    `latents` is the memory-mapped set (`open_latents`): each step reads its rows from the page cache, which the
    workers of a node share, so host memory does not grow with the workers. On a GPU with room the set is copied
    there once. A dict of tensors in memory (tests, benchmarks) counts as one shard.
    """

    def __init__(
        self, latents: LatentSet | dict[str, torch.Tensor], scaling_factor: float, seed: int, device: torch.device
    ):
        latents = LatentSet([latents]) if isinstance(latents, dict) else latents
        keep_on_device = device.type == "cuda" and _fits_on_gpu(latents.nbytes(), device)
        self.store = device if keep_on_device else torch.device("cpu")
        self.latents = latents.to(device) if keep_on_device else latents
        self.posterior = "mean" in latents.keys
        self.count, self.flips = latents.count, latents.shape("mean" if self.posterior else "sample")[1]
        self.scaling_factor, self.seed, self.device = scaling_factor, seed, device
        self.epoch, self.order = -1, None

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self.epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.count)
            self.epoch, self.order = epoch, torch.from_numpy(perm).to(self.store)
        return self.order

    def position(self, step: int, global_batch: int) -> tuple[int, int]:
        """(epoch, index of the first example of the step's global batch within that epoch's permutation)."""
        epoch, i = divmod(step, self.count // global_batch)
        return epoch, i * global_batch

    def batch(self, step: int, rank: int, world: int, global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = global_batch // world
        epoch, start = self.position(step, global_batch)
        idx = self.permutation(epoch)[start + rank * b : start + (rank + 1) * b]  # (b,)
        flip = torch.randint(0, self.flips, (b,), device=self.store)  # index 0 = original, 1 = flipped
        parts = [self.latents.take("label", idx)]
        parts += [self.latents.take(k, idx, flip) for k in (("mean", "std") if self.posterior else ("sample",))]
        if self.store != self.device:
            parts = [p.pin_memory().to(self.device, non_blocking=True) for p in parts]
        y, z = parts[0], parts[1].float()  # z: (b, C, h, w) the posterior mean, or the stored sample
        if self.posterior:
            z = z + parts[2].float() * torch.randn(z.shape, device=self.device)
        return z * self.scaling_factor, y


def _fits_on_gpu(nbytes: int, device: torch.device) -> bool:
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return nbytes <= LATENTS_GPU_FRACTION * free_bytes


def load_latent_batches(latents_dir: str | Path, seed: int, device: torch.device) -> tuple[LatentBatches, dict]:
    manifest, latents = open_latents(latents_dir)
    return LatentBatches(latents, float(manifest["scaling_factor"]), seed, device), manifest


# --- model, EMA, optimiser and the step ---------------------------------------------------------------------------


def build_model(p: TrainParams, latent_shape, num_classes: int, overrides: dict | None = None) -> DiT:
    """The preset `p.model` for latents (C, h, w); `overrides` (tests, ablations) replace any constructor kwarg."""
    channels, h, w = latent_shape
    if h != w:
        raise ValueError(f"DiT needs square latents, got {h}x{w}")
    model = DiT_models[p.model](
        input_size=h,
        in_channels=channels,
        num_classes=num_classes,
        class_dropout_prob=p.class_dropout_prob,
        conditioning=p.conditioning,
        activation_checkpointing=p.activation_checkpointing,
    )
    return DiT.from_config({**model.config, **overrides}) if overrides else model


@torch.no_grad()
def update_ema(ema_params: list[torch.Tensor], model_params: list[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * theta, for all tensors in one fused foreach op."""
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)


def learning_rate(p: TrainParams, step: int) -> float:
    """The lr of 0-based step `step`: a linear warmup to p.lr over warmup_steps, then constant or a cosine to 0."""
    if step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    if p.lr_schedule == "constant":
        return p.lr
    decay_steps = max(p.train_steps - p.warmup_steps, 1)
    return p.lr * 0.5 * (1.0 + math.cos(math.pi * min(step - p.warmup_steps, decay_steps) / decay_steps))


def timestep_weights(num_timesteps: int, sampling: str) -> torch.Tensor | None:
    """Unnormalised probabilities of t = 0..T-1 for torch.multinomial, or None for uniform (torch.randint, as the
    official train.py). Logit-normal: the density of sigmoid(N(0, 1)) at the bin centres (t + 0.5) / T."""
    if sampling == "uniform":
        return None
    u = (torch.arange(num_timesteps, dtype=torch.float64) + 0.5) / num_timesteps
    logit = torch.log(u) - torch.log1p(-u)
    return (torch.exp(-0.5 * logit**2) / (u * (1 - u))).float()


def draw_timesteps(s: "TrainState", b: int, device: torch.device) -> torch.Tensor:
    if s.timestep_weights is None:
        return torch.randint(0, s.diffusion.num_timesteps, (b,), device=device)
    return torch.multinomial(s.timestep_weights, b, replacement=True).to(device)


@dataclass
class TrainState:
    model: DiT  # the raw module: its state_dict has the official flat layout
    net: torch.nn.Module  # what the step calls: the model, wrapped in DDP and/or compiled
    ema: DiT
    opt: torch.optim.Optimizer
    params: TrainParams
    device: torch.device

    def __post_init__(self):
        names = [n for n, q in self.model.named_parameters() if q.requires_grad]  # pos_embed is frozen
        self.trainable = [self.model.get_parameter(n) for n in names]
        self.ema_params = [self.ema.get_parameter(n) for n in names]
        self.diffusion = create_diffusion("", **diffusion_record(self.model.config))
        # The diffusion maps t through timestep_map on the model's device at every call: keep the map there, so no
        # step waits on a host-to-device copy (a pageable copy synchronises the stream).
        self.diffusion.timestep_map = self.diffusion.timestep_map.to(self.device)
        self.timestep_weights = timestep_weights(self.diffusion.num_timesteps, self.params.timestep_sampling)


def make_train_state(model: DiT, p: TrainParams, device: torch.device, world: int, ckpt: dict | None) -> TrainState:
    """Model, EMA (a copy of the model, as the official update_ema(ema, model, decay=0)) and AdamW on `device`,
    restored from `ckpt` when given, then wrapped in DDP on the local device (world > 1) and compiled."""
    model = model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    convert_to_fp8(model, p.fp8)  # in place, same parameters and state_dict keys; the EMA stays plain
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=p.lr, weight_decay=p.weight_decay, fused=device.type == "cuda" or None)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if p.compile:
        net = torch.compile(net, mode=p.compile_mode)
    return TrainState(model, net, ema, opt, p, device)


def train_step(s: TrainState, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
    """One optimiser step on this rank's batch x (b, C, h, w), y (b,); draws t, noise and label dropout from the
    global RNG. Returns (4,) [loss, mse, vb, grad_norm] on the device, without a host sync."""
    if s.params.compile:
        torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs (reduce-overhead) may reuse last step's buffers
    t = draw_timesteps(s, x.shape[0], x.device)
    with (
        torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.params.precision == "bf16"),
        attention_backend(s.params.attention),
    ):  # the backward runs the same kernel's gradient
        terms = s.diffusion.training_losses(s.net, x, t, model_kwargs=dict(y=y))
    loss = terms["loss"].mean()
    s.opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([q.grad for q in s.trainable])))
    if s.params.grad_clip is not None:
        torch._foreach_mul_([q.grad for q in s.trainable], (s.params.grad_clip / (grad_norm + 1e-6)).clamp(max=1.0))
    for group in s.opt.param_groups:
        group["lr"] = lr
    s.opt.step()
    update_ema(s.ema_params, s.trainable, s.params.ema_decay)
    vb = terms["vb"].mean() if "vb" in terms else torch.zeros_like(loss)
    return torch.stack([loss, terms["mse"].mean(), vb, grad_norm]).detach()


def run_step(s: TrainState, data: LatentBatches, step: int, rank: int, world: int) -> torch.Tensor:
    """0-based training step `step` on rank `rank`: seed, draw the batch, update. Everything random in it is a
    function of (seed, step, rank), which is what makes a resumed run identical to an uninterrupted one."""
    torch.manual_seed(step_seed(s.params.seed, step, rank))  # seeds the CPU and every CUDA generator
    x, y = data.batch(step, rank, world, s.params.global_batch_size)
    return train_step(s, x, y, learning_rate(s.params, step))


# --- the loop -----------------------------------------------------------------------------------------------------


def worker_context(distributed: bool, use_gpu: bool) -> tuple[int, int, torch.device]:
    """(rank, world size, this worker's local device)."""
    if distributed:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError("train.use_gpu is true but torch sees no CUDA device; set train.use_gpu: false")
    return 0, 1, torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")


def configure_torch(device: torch.device, precision: str) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
        set_float32_mode(precision)  # a training worker runs one precision for its whole life


class Loop:
    """The steps from a start step to train_steps on one worker, with the collective checks at log and
    checkpoint steps (the only host syncs)."""

    def __init__(self, state: TrainState, data: LatentBatches, config: dict, rank: int, world: int, ckpt, store):
        self.s, self.data, self.config, self.rank, self.world = state, data, config, rank, world
        self.store = store  # pipeline/checkpoint_storage.py
        self.p = state.params
        self.start = ckpt["step"] if ckpt else 0
        self.timing = dict(ckpt["timing"]) if ckpt else {"train_s": 0.0}  # seconds in training steps, all runs
        self.sums = torch.zeros(4, device=state.device, dtype=torch.float64)  # loss, mse, vb, grad_norm
        self.first_bad = torch.full((), 2**62, device=state.device, dtype=torch.int64)
        self.interval_steps, self.interval_s = 0, 0.0
        self.reporter: Reporter | None = None
        # The lowest logged loss after the first tenth of the run, the runaway guard's yardstick. Every rank reads
        # the same all-reduced values, so every rank decides alike; a resumed run reads it from its checkpoint's log.
        self.guard_from = self.p.train_steps // 10
        late = [row["loss"] for row in (ckpt["log"] if ckpt else []) if row["step"] > self.guard_from]
        self.lowest_loss = min(late, default=math.inf)

    def run(self) -> None:
        mark_ready()
        self.clock = time.perf_counter()
        for step in range(self.start, self.p.train_steps):
            stats = run_step(self.s, self.data, step, self.rank, self.world)
            self.sums += stats
            done = step + 1
            self.first_bad = torch.where(torch.isfinite(stats[0]), self.first_bad, self.first_bad.clamp(max=done))
            self.interval_steps += 1
            if self.reporter:
                self.reporter.pbar.update(1)
            if (
                done % self.p.log_every == 0
                or done % self.p.ckpt_every == 0
                or done % self.p.sample_every == 0
                or done == self.p.train_steps
            ):
                self.housekeeping(done)

    def housekeeping(self, done: int) -> None:
        self.check_finite(done)  # collective: every rank stops together
        now = time.perf_counter()
        self.interval_s += now - self.clock
        self.timing["train_s"] += now - self.clock
        if done % self.p.log_every == 0 or done == self.p.train_steps:
            self.log(done)  # before the checkpoint: a run that has diverged is stopped before it overwrites one
        if done % self.p.ckpt_every == 0 or done == self.p.train_steps:
            self.checkpoint(done)  # every rank: Ray Train's report is collective; only rank 0 writes
        if self.rank == 0 and done % self.p.sample_every == 0:
            self.reporter.sample_grid(self.s.ema, done, self.s.device, self.p.precision == "bf16")
        self.clock = time.perf_counter()  # img/s counts training steps, not checkpoint writes or sample grids

    def check_finite(self, done: int) -> None:
        first_bad = self.first_bad.clone()
        if self.world > 1:
            torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
        bad_step = first_bad.item()
        if bad_step <= done:
            raise FloatingPointError(
                f"the training loss became NaN or Inf at step {bad_step}; stopped at step {done} without "
                f"checkpointing. The last good checkpoint is {self.last_checkpoint()}; "
                "a rerun as it is repeats this step by step: lower train.lr, set train.grad_clip or use precision "
                "fp32 to train afresh (dvc repro moves these checkpoints aside)."
            )

    def log(self, done: int) -> None:
        sums = self.sums.clone()
        if self.world > 1:
            torch.distributed.all_reduce(sums)
        loss, mse, vb, grad_norm = (sums / (self.world * self.interval_steps)).tolist()
        img_per_s = self.interval_steps * self.p.global_batch_size / self.interval_s
        row = dict(step=done, loss=loss, mse=mse, vb=vb, grad_norm=grad_norm, img_per_s=img_per_s)
        if self.reporter:
            self.reporter.log(row)
        self.sums.zero_()
        self.interval_steps, self.interval_s = 0, 0.0
        self.check_runaway(done, loss)

    def last_checkpoint(self) -> str:
        """The newest checkpoint in models/checkpoints, named by the messages that stop a run."""
        last = list_checkpoints(self.config["checkpoints"])
        return str(last[-1]) if last else "none (no checkpoint yet)"

    def check_runaway(self, done: int, loss: float) -> None:
        """Stop when the loss has run away: finite, so check_finite lets it pass, but far above its lowest."""
        if done <= self.guard_from:
            return
        ratio = self.p.max_loss_ratio
        if ratio is not None and loss > ratio * self.lowest_loss:
            raise FloatingPointError(
                f"the training loss ran away: {loss:.4g} in the window ending at step {done}, over "
                f"train.max_loss_ratio {ratio:g} times its lowest logged value {self.lowest_loss:.4g}; stopped "
                f"without checkpointing. The last good checkpoint is {self.last_checkpoint()}. A rerun as it is "
                "repeats this step by step; raise train.max_loss_ratio (null turns the check off) to resume from "
                "that checkpoint, or lower train.lr to train afresh (dvc repro moves these checkpoints aside)."
            )
        self.lowest_loss = min(self.lowest_loss, loss)

    def checkpoint(self, done: int) -> None:
        if self.rank != 0:
            self.store.save(done, None)
            return
        epoch, position = self.data.position(done, self.p.global_batch_size)
        payload = {
            "format": CHECKPOINT_FORMAT[0],
            "version": CHECKPOINT_FORMAT[1],
            "step": done,
            "model": self.s.model.state_dict(),
            "ema": self.s.ema.state_dict(),
            "opt": self.s.opt.state_dict(),
            "rng": capture_rng({"seed": self.p.seed, "epoch": epoch, "position": position}),
            "model_config": self.s.model.config,
            "diffusion": diffusion_record(self.s.model.config),
            "train_params": to_dict(self.p),
            "latents_sha256": self.config["latents_sha256"],
            "provenance": self.config["provenance"],
            "mlflow_run_id": self.reporter.tracker.run_id,
            "log": list(self.reporter.rows),
            "timing": dict(self.timing),
        }
        self.store.save(done, payload)


def train_loop_per_worker(config: dict) -> None:
    """The training loop of one worker (Ray Train's `train_loop_per_worker`, or in-process). `config` holds plain
    values only: the train and tracking params as dicts, absolute paths, the MLflow tags and model overrides."""
    p = from_dict(TrainParams, config["train"], "train")
    rank, world, device = worker_context(config["distributed"], p.use_gpu)
    configure_torch(device, p.precision)
    if config["tracking_uri"]:
        use_recorded_store(config["tracking_uri"])  # a Ray worker may run in another directory or node
    data, manifest = load_latent_batches(on_this_node(config["latents"]), p.seed, device)
    seed_everything(p.seed)  # the same initial weights on every rank
    model = build_model(p, manifest["latent_shape"], manifest["num_classes"], config["model_overrides"])
    store = worker_store(config, p.keep_checkpoints, rank)
    ckpt, where = store.latest()
    if ckpt is not None:
        check_resumable(ckpt, Path(where), p, model.config, config["latents_sha256"], _required_stamp(config))
        restore_rng(ckpt["rng"])
    loop = Loop(
        make_train_state(model, p, device, world, ckpt),
        data,
        {**config, "model_config": model.config},
        rank,
        world,
        ckpt,
        store,
    )
    if rank == 0:
        store.clear_interrupted_writes()
        loop.reporter = Reporter(
            loop.config,
            p,
            ckpt,
            loop.start,
            tuple(manifest["latent_shape"]),
            manifest["num_classes"],
            diffusion_record(model.config),
        )
    status = "FAILED"
    try:
        loop.run()
        status = "FINISHED"
    finally:
        if loop.reporter:
            loop.reporter.close(status)


# --- the driver ---------------------------------------------------------------------------------------------------


def fit_with_ray(config: dict, p: TrainParams, run_name: str):
    """Ray Train's Result of the run."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.cluster import init_ray

    init_ray()
    # CPU workers share the cluster's CPUs (Ray sizes each worker's torch thread pool from this); GPU workers
    # keep Ray's default of one CPU each beside their GPU.
    per_worker = None if p.use_gpu else {"CPU": max(1, int(ray.cluster_resources().get("CPU", 1)) // p.num_workers)}
    # GPU workers pack onto as few nodes as hold them (DDP within a node is cheapest); CPU workers spread, one per
    # node first, since each takes a share of its node's cores.
    scaling = ScalingConfig(
        num_workers=p.num_workers,
        use_gpu=p.use_gpu,
        resources_per_worker=per_worker,
        placement_strategy="PACK" if p.use_gpu else "SPREAD",
    )
    storage = (
        dict(storage_path=p.storage_path, checkpoint_config=CheckpointConfig(num_to_keep=p.keep_checkpoints))
        if p.storage_path
        else {}
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=scaling,
        run_config=RunConfig(
            name=run_name, **storage, failure_config=FailureConfig(max_failures=WORKER_GROUP_RESTARTS)
        ),
    )
    return trainer.fit()


def train(
    p: TrainParams,
    tracking: TrackingParams,
    latents_dir: str | Path,
    checkpoints_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path,
    plots_path: str | Path,
    vae_dir: str | Path | None = None,
    model_overrides: dict | None = None,
    restart_on_mismatch: bool = False,
    resume_across_versions: bool = False,
    plot_image_path: str | Path | None = None,
) -> dict:
    """Train (or resume) up to `p.train_steps`, then write `out_dir`/{ema.pt, model.json, tracking.json} and the
    metrics (and the CSV log's PNG at `plot_image_path`, when given). Returns the
    metrics. A checkpoint of another run in `checkpoints_dir` is an error, unless
    `restart_on_mismatch` (the user asks to train from scratch): then its checkpoints are moved aside to
    `models/superseded/` (pipeline/persisted.py). Checkpoints of other code or packages count as another run, unless
    `resume_across_versions`."""
    started = time.time()
    manifest = read_latents_manifest(latents_dir)
    check_batch_fits(p, manifest["count"])
    _check_vae(vae_dir, manifest)
    Path(checkpoints_dir).mkdir(parents=True, exist_ok=True)  # a DVC output even when nothing is trained
    if local_input(p.official_checkpoint):
        return import_official(p, tracking, manifest, out_dir, metrics_path, plots_path, plot_image_path)
    tracker = Tracker(tracking)  # creates the experiment once, from the driver
    config = {
        "train": to_dict(p),
        "tracking": to_dict(tracking),
        "distributed": p.num_workers > 0,
        "latents": str(Path(latents_dir).resolve()),
        "vae": str(Path(vae_dir).resolve()) if vae_dir else None,
        "checkpoints": str(Path(checkpoints_dir).resolve()),
        "plots": str(Path(plots_path).resolve()),
        "latents_sha256": sha256_file(Path(latents_dir) / "manifest.json"),
        "model_overrides": model_overrides,
        "tracking_uri": public_uri(tracker.uri) if tracker.enabled else None,  # Ray keeps the config: no secrets
        "provenance": stamp("train"),
        "resume_across_versions": resume_across_versions,
    }
    config["tags"] = run_tags(latents_manifest_sha256=config["latents_sha256"])
    resolve_checkpoints(p, manifest, config, restart_on_mismatch)
    run_name = f"dit-train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    if p.storage_path:  # workers read and write checkpoints through Ray Train's storage, not this file system
        config["storage"] = {"initial": seed_run(p.storage_path, run_name, checkpoints_dir)}
        config["plots"] = None  # rank 0 may run on another node: the driver writes the CSV log from the checkpoint
        config["latents"] = publish(latents_dir, p.storage_path, "latents")  # each node copies it once
        config["vae"] = publish(vae_dir, p.storage_path, "vae") if vae_dir else None  # rank 0's sample grids
    if p.num_workers == 0:
        train_loop_per_worker(config)
    else:
        result = fit_with_ray(config, p, run_name)
        if p.storage_path:
            fill_local(result.best_checkpoints, checkpoints_dir, p.keep_checkpoints)
    final, path = latest_checkpoint(checkpoints_dir)
    if final is None or final["step"] != p.train_steps:
        raise RuntimeError(f"training ended without a checkpoint at step {p.train_steps} in {checkpoints_dir}")
    if p.storage_path:
        atomic_write(plots_path, lambda tmp: tmp.write_text(csv_text(final["log"], header=True)))
    if plot_image_path:
        write_log_plot(final["log"], plot_image_path)
    return export(final, manifest, p, tracking, out_dir, metrics_path, time.time() - started)


def resolve_checkpoints(p: TrainParams, manifest: dict, config: dict, restart: bool) -> None:
    """Check the latest checkpoint before any worker starts: resume it, fail fast, or (`restart`) move another run's
    checkpoints aside, never deleting them. Before a fresh start, check that the disk holds `keep_checkpoints` new
    checkpoints, each the size of the moved run's latest (or, with none, 4 float32 copies of the parameters:
    weights, EMA and AdamW's two moments)."""
    directory = Path(config["checkpoints"])
    ckpt, path = latest_checkpoint(directory)
    with torch.device("meta"):  # the model's config and size without allocating its weights
        model = build_model(p, manifest["latent_shape"], manifest["num_classes"], config["model_overrides"])
    why = resume_mismatch(ckpt, p, model.config, config["latents_sha256"], _required_stamp(config)) if ckpt else []
    if ckpt is not None and not why:
        return
    if why and not restart:
        check_resumable(ckpt, path, p, model.config, config["latents_sha256"], _required_stamp(config))
    one = path.stat().st_size if path else 4 * 4 * sum(q.numel() for q in model.parameters())
    check_free_space(
        directory,
        one * p.keep_checkpoints,
        f"train.keep_checkpoints={p.keep_checkpoints} checkpoints",
        superseded_root(directory),
    )
    if ckpt is not None:
        LocalCheckpoints(directory, p.keep_checkpoints, rank=0).clear_interrupted_writes()  # not worth keeping
        run = {k: ckpt.get(k) for k in ("train_params", "model_config", "latents_sha256", "provenance")}
        move_checkpoints_aside(directory, f"train-{run_name(run)}", why)


def _required_stamp(config: dict) -> dict | None:
    """The code and package stamp a checkpoint must match to be resumed; None when resuming across versions."""
    return None if config["resume_across_versions"] else config["provenance"]


def _check_vae(vae_dir, manifest: dict) -> None:
    if vae_dir is None:
        return
    scale = json.loads(require_file(Path(vae_dir) / "config.json", "vae").read_text())["scaling_factor"]
    if not math.isclose(scale, manifest["scaling_factor"], rel_tol=1e-6):
        raise ArtifactError(
            f"{vae_dir} has scaling_factor {scale}, the latents {manifest['scaling_factor']}: they "
            "come from different VAEs; run `dvc repro encode`"
        )


def diffusion_record(model_config: dict) -> dict:
    """The diffusion this stage trains with, as the model card and the checkpoints record it."""
    return {**DIT_DIFFUSION, "learn_sigma": model_config["learn_sigma"]}


def write_model(out_dir, ema: dict, name: str, model_config: dict, manifest: dict, train_steps: int) -> None:
    """`ema.pt` in the official flat layout, and `model.json`: everything needed to rebuild and sample it."""
    write_model_card(out_dir, ema, name, model_config, diffusion_record(model_config), manifest, train_steps)


def write_tracking_record(out_dir, tracker: Tracker) -> None:
    atomic_write_json(
        Path(out_dir) / "tracking.json",
        {"mlflow_run_id": tracker.run_id, "tracking_uri": public_uri(tracker.uri) if tracker.enabled else None},
    )


def import_official(
    p: TrainParams, tracking: TrackingParams, manifest: dict, out_dir, metrics_path, plots_path, plot_image_path=None
) -> dict:
    """`train.official_checkpoint`: no training; the official EMA weights become this stage's model, after a
    strict load into the `train.model` preset at the latents' size (official checkpoints carry no config)."""
    path = require_file(p.official_checkpoint, "train")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("ema", state)  # the official train.py's checkpoints wrap the EMA; released ones are flat
    model = build_model(p, manifest["latent_shape"], manifest["num_classes"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(
            f"{path} does not fit {p.model} at latent {manifest['latent_shape']} with "
            f"{manifest['num_classes']} classes; set train.model to its preset"
        ) from e
    write_model(out_dir, model.state_dict(), p.model, model.config, manifest, train_steps=0)
    tracker = Tracker(tracking)
    tracker.start(
        f"official {p.model}",
        {"train": to_dict(p)},
        run_tags(official_checkpoint=Path(path).name, official_checkpoint_sha256=sha256_file(path)),
        system_metrics=False,
    )
    tracker.end()
    write_tracking_record(out_dir, tracker)
    atomic_write(plots_path, lambda tmp: tmp.write_text(csv_text([], header=True)))
    if plot_image_path:
        write_log_plot([], plot_image_path)
    metrics = {"steps": 0}  # the checkpoint's hash is a tag of the MLflow run, not a number to compare
    atomic_write_json(metrics_path, metrics)
    return metrics


def export(
    ckpt: dict, manifest: dict, p: TrainParams, tracking: TrackingParams, out_dir, metrics_path, wall_s: float
) -> dict:
    """The stage outputs from the final checkpoint: the EMA in the official flat layout, its description, the
    MLflow run id and the metrics (loss = mean of the last log interval; its mse and vb terms are in the CSV log
    and MLflow). Returns the metrics with those terms and the seconds spent in training steps."""
    out_dir = Path(out_dir)
    write_model(out_dir, ckpt["ema"], p.model, ckpt["model_config"], manifest, ckpt["step"])
    tracker = Tracker(tracking, ckpt["mlflow_run_id"] if tracking.enabled else None)
    write_tracking_record(out_dir, tracker)
    last = ckpt["log"][-1]
    metrics = {
        "loss": last["loss"],
        "mse": last["mse"],
        "vb": last["vb"],
        "steps": ckpt["step"],
        "img_per_s": ckpt["step"] * p.global_batch_size / ckpt["timing"]["train_s"],
        "train_s": ckpt["timing"]["train_s"],
        "seconds": wall_s,
    }
    atomic_write_json(metrics_path, {k: metrics[k] for k in ("loss", "steps", "img_per_s", "seconds")})
    tracker.resume()
    tracker.log_metrics({f"final/{k}": v for k, v in metrics.items()}, step=ckpt["step"])
    tracker.log_artifact(out_dir / "model.json")
    tracker.end()
    return metrics
