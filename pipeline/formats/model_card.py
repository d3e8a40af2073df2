"""`models/dit/`: the trained model as the train stage exports it, `ema.pt` (the EMA weights in the official flat
state_dict layout, loadable by the official sample.py) and `model.json`, everything needed to rebuild and sample it:
the preset and constructor kwargs, the diffusion it was trained with, the latent shape and scale, the classes.

Written by train (`write_model_card`); read by sample, evaluate, register and the registered pyfunc through
`read_model_card` / `read_diffusion`, which import neither the network nor the training loop.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.artifacts import ArtifactError, atomic_torch_save, atomic_write_json, require_file, sha256_file

STAGE = "train"
CARD_FILE, EMA_FILE = "model.json", "ema.pt"
CARD_KEYS = ("model", "model_kwargs", "diffusion", "latent_shape", "scaling_factor", "num_classes")
DIFFUSION_KEYS = ("noise_schedule", "diffusion_steps", "learn_sigma")


def write_model_card(
    out_dir: str | Path, ema: dict, name: str, model_config: dict, diffusion: dict, manifest: dict, train_steps: int
) -> None:
    """`ema.pt` (tensors of `ema`, detached, on the CPU) and `model.json`; `manifest` is the latents' manifest."""
    out_dir = Path(out_dir)
    atomic_torch_save(out_dir / EMA_FILE, {k: v.detach().cpu().contiguous() for k, v in ema.items()})
    atomic_write_json(
        out_dir / CARD_FILE,
        {
            "model": name,
            "model_kwargs": model_config,
            "diffusion": diffusion,
            "latent_shape": manifest["latent_shape"],
            "scaling_factor": manifest["scaling_factor"],
            "image_size": manifest["image_size"],
            "num_classes": manifest["num_classes"],
            "class_names": manifest["class_names"],
            "train_steps": train_steps,
            "ema_sha256": sha256_file(out_dir / EMA_FILE),
        },
    )


def read_diffusion(record: dict, where: str, fix: str = f"run `dvc repro {STAGE}`") -> dict:
    """The `diffusion` entry of a model card (or a checkpoint): noise_schedule, diffusion_steps, learn_sigma."""
    diffusion = record.get("diffusion")
    missing = DIFFUSION_KEYS if not isinstance(diffusion, dict) else [k for k in DIFFUSION_KEYS if k not in diffusion]
    if missing:
        raise ArtifactError(
            f"{where} does not record the diffusion it was trained with (lacks {list(missing)}); "
            f"it predates that record: {fix}"
        )
    return {k: diffusion[k] for k in DIFFUSION_KEYS}


def read_model_json(dit_dir: str | Path) -> dict:
    """models/dit/model.json as written, its keys checked (not the weights)."""
    path = require_file(Path(dit_dir) / CARD_FILE, STAGE)
    card = json.loads(path.read_text())
    missing = [k for k in CARD_KEYS if k not in card]
    if missing:
        raise ArtifactError(f"{path} lacks {missing}; run `dvc repro {STAGE}`")
    read_diffusion(card, str(path))
    return card


def read_model_card(dit_dir: str | Path) -> dict:
    """model.json plus `checkpoint` (the path of ema.pt) and its verified `checkpoint_sha256`."""
    dit_dir = Path(dit_dir)
    card = read_model_json(dit_dir)
    ema = require_file(dit_dir / EMA_FILE, STAGE)
    sha = sha256_file(ema)
    if card.get("ema_sha256") not in (None, sha):
        raise ArtifactError(
            f"{ema} (sha256 {sha[:12]}) is not the file model.json describes "
            f"({card['ema_sha256'][:12]}); run `dvc repro {STAGE}`"
        )
    return {**card, "checkpoint": str(ema), "checkpoint_sha256": sha}
