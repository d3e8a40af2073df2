"""Training checkpoints: atomic, self-describing, resumable only by the run that wrote them.

A checkpoint is a `torch.save`d dict of plain tensors, numbers, strings and lists (read back with
`weights_only=True`): model, EMA, optimizer, step, every RNG state, the model config, the train params, the latents'
manifest hash, the code and package stamp (`provenance.stamp`), the MLflow run id and the training log. Writes are
atomic (temp file, fsync, rename), so a crash while writing leaves the previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts import ArtifactError, atomic_torch_save
from pipeline.code_stamp import stamp_mismatch
from pipeline.persisted import superseded_root

CHECKPOINT_FORMAT = ("dit-train-checkpoint", 1)
# Train params that change the optimisation trajectory: a checkpoint made with other values is not resumed.
# The others (train_steps, *_every, keep_checkpoints, num_workers, use_gpu, compile*, activation_checkpointing) may
# change on resume.
RESUME_KEYS = (
    "model",
    "conditioning",
    "global_batch_size",
    "lr",
    "weight_decay",
    "warmup_steps",
    "lr_schedule",
    "timestep_sampling",
    "ema_decay",
    "class_dropout_prob",
    "grad_clip",
    "precision",
    "seed",
)


def capture_rng(data_order: dict) -> dict:
    """Every RNG state of this process, as plain tensors and lists (torch.load(weights_only=True) reads them)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached_gaussian": cached,
        },
        "python": [version, list(state), gauss],
        "data": data_order,
    }


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    n = rng["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))


# --- checkpoints --------------------------------------------------------------------------------------------------


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (an interrupted write leaves only a hidden temp file)."""
    return sorted(Path(directory).glob("ckpt-*.pt"), key=lambda f: int(f.stem.split("-")[1]))


def save_checkpoint(directory: str | Path, payload: dict, keep: int) -> Path:
    """Write `payload` as ckpt-<step>.pt, then delete all but the latest `keep` (train.keep_checkpoints)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the checkpoint just written), got {keep}")
    path = Path(directory) / f"ckpt-{payload['step']:07d}.pt"
    atomic_torch_save(path, payload)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: str | Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: read tensors on use
    if [ckpt.get("format"), ckpt.get("version")] != list(CHECKPOINT_FORMAT):
        raise ArtifactError(f"{path} is not a {CHECKPOINT_FORMAT[0]} v{CHECKPOINT_FORMAT[1]} checkpoint")
    return ckpt


def resume_mismatch(ckpt: dict, p, model_config: dict, latents_sha256: str, code_stamp: dict | None) -> list[str]:
    """Why `ckpt` cannot be continued by this run (empty when it can): a checkpoint resumes only the run it came
    from, never another experiment's weights with other trajectory-defining params, model or data, nor weights
    made by other code or packages (`code_stamp`: `provenance.stamp`; None = the user resumes across versions)."""
    old = ckpt["train_params"]
    why = stamp_mismatch(ckpt.get("provenance"), code_stamp) if code_stamp is not None else []
    why += [f"train.{k}: {old.get(k)!r} -> {getattr(p, k)!r}" for k in RESUME_KEYS if old.get(k) != getattr(p, k)]
    why += [
        f"model.{k}: {ckpt['model_config'].get(k)!r} -> {v!r}"
        for k, v in model_config.items()
        if k != "activation_checkpointing" and ckpt["model_config"].get(k) != v
    ]
    if ckpt["latents_sha256"] != latents_sha256:
        why.append("the latents changed (their manifest.json sha256)")
    if p.lr_schedule != "constant" and old.get("train_steps") != p.train_steps:
        why.append(
            f"train.train_steps: {old.get('train_steps')!r} -> {p.train_steps!r} (the {p.lr_schedule} lr schedule "
            "decays over train_steps)"
        )
    if ckpt["step"] > p.train_steps:
        why.append(f"it is at step {ckpt['step']}, past train.train_steps {p.train_steps}")
    return why


def check_resumable(
    ckpt: dict, path: Path, p, model_config: dict, latents_sha256: str, code_stamp: dict | None
) -> None:
    why = resume_mismatch(ckpt, p, model_config, latents_sha256, code_stamp)
    if why:
        raise ArtifactError(
            f"{path} cannot be resumed by this run ({'; '.join(why)}). Restore those params to "
            "continue it, or pass --restart-on-mismatch to the stage to move its checkpoints aside "
            f"(to {superseded_root(path.parent)}/, kept) and train from scratch; after a code or "
            "package change, --resume-across-versions continues it anyway."
        )


def latest_checkpoint(directory: str | Path) -> tuple[dict, Path] | tuple[None, None]:
    ckpts = list_checkpoints(directory)
    return (load_checkpoint(ckpts[-1]), ckpts[-1]) if ckpts else (None, None)
