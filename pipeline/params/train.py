"""The `train` section: the model, the optimisation and the checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.model import DiT_models
from pipeline.params.load import ParamsError
from pipeline.params.rules import (
    AttentionBackend,
    FP8Mode,
    Precision,
    check_attention,
    check_fp8,
    check_precision,
    check_storage_path,
)


@dataclass(frozen=True)
class TrainParams:
    model: str  # a key of pipeline.model.DiT_models
    conditioning: Literal["adaLN-Zero", "adaLN", "cross-attention", "in-context"]
    global_batch_size: int  # summed over workers
    train_steps: int
    lr: float  # AdamW, default betas; the peak, reached after the optional linear warmup
    weight_decay: float
    warmup_steps: int
    # After the warmup: constant (the paper), or a cosine from lr down to 0 at train_steps. A decaying run ends at
    # train_steps, so it resumes only under the same train_steps.
    lr_schedule: Literal["constant", "cosine"]
    # How t is drawn for each example: uniform over the 1,000 steps (the paper), or logit-normal (Esser et al. 2024,
    # mean 0, std 1, over (t + 0.5) / 1000), which draws the middle of the schedule more often than its ends.
    timestep_sampling: Literal["uniform", "logit-normal"]
    ema_decay: float
    class_dropout_prob: float
    grad_clip: float | None  # max global grad norm; None = off (the paper)
    precision: Precision  # fp32 | tf32 (the official scripts) | bf16 autocast; weights, optimiser and EMA stay fp32
    compile: bool
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
    activation_checkpointing: bool
    ckpt_every: int
    keep_checkpoints: int  # the latest this many checkpoints stay on disk; the curve stage evaluates each of them
    log_every: int
    sample_every: int
    num_workers: int  # 0 = in-process without Ray
    use_gpu: bool
    seed: int
    # An official checkpoint (e.g. DiT-XL-2-256x256.pt) to export instead of training: the `official-xl2` profile.
    official_checkpoint: str  # a local .pt tracked with `dvc add` (a dvc.yaml dep); provenance.NO_INPUT = train
    attention: AttentionBackend = "auto"  # the SDPA kernel (pipeline/attention.py); params.yaml always names it
    fp8: FP8Mode = "none"  # torchao Float8 linear layers in the blocks (pipeline/fp8.py); params.yaml always names it
    # Ray Train's persistent storage for the checkpoints while training (pipeline/checkpoint_storage.py): s3://...
    # or an absolute directory every node mounts; "" = models/checkpoints itself. params.yaml always names it.
    storage_path: str = ""
    # Stop a training whose logged loss (a mean over log_every steps), after the first tenth of train_steps, rises
    # above this many times its lowest logged value so far: a run that has diverged, with the last checkpoint kept.
    # None = off. params.yaml always names it.
    max_loss_ratio: float | None = None

    def __post_init__(self):
        check_params(self)


def check_params(p: TrainParams) -> None:
    """Every rule on the section alone; `check_batch_fits` adds the one that needs the latents."""
    if p.model not in DiT_models:
        raise ParamsError(f"'train.model' {p.model!r} is not a preset; choose one of {sorted(DiT_models)}")
    world = max(p.num_workers, 1)
    if p.global_batch_size % world:
        raise ParamsError(
            f"'train.global_batch_size' {p.global_batch_size} is not divisible by train.num_workers "
            f"{world}: every worker needs the same batch"
        )
    for key in ("global_batch_size", "train_steps", "ckpt_every", "keep_checkpoints", "log_every", "sample_every"):
        if getattr(p, key) < 1:
            raise ParamsError(f"'train.{key}' must be >= 1, got {getattr(p, key)}")
    if p.warmup_steps < 0 or p.num_workers < 0:
        raise ParamsError(
            f"'train.warmup_steps' and 'train.num_workers' must be >= 0, got {p.warmup_steps} and {p.num_workers}"
        )
    if p.max_loss_ratio is not None and not p.max_loss_ratio > 1:
        raise ParamsError(f"'train.max_loss_ratio' must be > 1 or null (off), got {p.max_loss_ratio}")
    if not 0 <= p.ema_decay < 1:
        raise ParamsError(f"'train.ema_decay' must be in [0, 1), got {p.ema_decay}")
    check_precision("train", p.precision, p.use_gpu)
    check_attention("train", p.attention, p.use_gpu)
    check_fp8("train", p.fp8, p.use_gpu, p.precision)
    if p.storage_path and p.num_workers == 0:
        raise ParamsError(
            "'train.storage_path' is Ray Train's storage: it needs train.num_workers >= 1 (or set it "
            'to "" to train in-process)'
        )
    check_storage_path("train.storage_path", p.storage_path)


def check_batch_fits(p: TrainParams, num_examples: int) -> None:
    if num_examples < p.global_batch_size:
        raise ParamsError(
            f"the latents hold {num_examples} examples, fewer than train.global_batch_size "
            f"{p.global_batch_size}: lower the batch or encode more images"
        )
