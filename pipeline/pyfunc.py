"""The trained DiT + VAE as an MLflow pyfunc model that turns class labels into images.

Contract of `predict`:
- input: a 1-D int64 array of class labels in [0, num_classes), shape (N,);
- params (all optional; their defaults are the sample stage's settings at registration, stored in the signature):
  `seed` (int), `cfg_scale` (float), `steps` (int), `sampler` ("ddpm" | "ddim" | "dpm-solver++");
- output: uint8 RGB images, shape (N, H, W, 3). Image i is seeded from (seed, i) exactly as sample i of the sample
  stage, so a call is deterministic and image i does not depend on N.

Served with `mlflow models serve -m models:/NAME@champion --env-manager local -p 5001`, a POST to /invocations of
`{"inputs": [3, 7], "params": {"seed": 1}}` answers `{"predictions": [...]}`: nested lists of shape (N, H, W, 3).

Nothing is pickled. The artifacts are files: models/dit (ema.pt, a flat state_dict, and model.json), the VAE's
save_pretrained snapshot and sampler_defaults.json. The model itself is logged "from code": MLflow stores this file
and, to load, runs it and takes the model passed to `set_model` at the bottom; `load_context` then reads the files.
The `pipeline` package travels as code too, so loading needs no install of this repository.
"""
from __future__ import annotations

import json
import tempfile
from importlib.metadata import version as installed_version
from pathlib import Path

import mlflow
import numpy as np

from pipeline.formats.model_card import read_model_json

PACKAGE_DIR = Path(__file__).resolve().parent
ARTIFACT_PATH = "model"  # the LoggedModel's name inside the run
SAMPLER_KEYS = ("seed", "sampler", "steps", "cfg_scale", "cfg_channels", "batch_size", "micro_batch", "precision")  # as `sample`
PARAM_KEYS = ("seed", "cfg_scale", "steps", "sampler")  # what a request may override
# Third-party distributions the `pipeline` modules used by predict import; torch is left open because the serving
# host brings its own CUDA build.
PINNED = ("diffusers", "huggingface_hub", "numpy", "safetensors", "pyyaml", "pillow", "tqdm", "pyarrow")


class DiTImageModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch

        from pipeline.formats.model_card import read_diffusion, read_model_card
        from pipeline.generate import load_models

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.card = read_model_card(context.artifacts["dit"])  # checks ema.pt against model.json's sha256
        self.model, self.vae = load_models(self.card, context.artifacts["vae"], self.device)
        self.diffusion = read_diffusion(self.card, "the registered model's model.json")
        self.defaults = json.loads(Path(context.artifacts["sampler"]).read_text())

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        """(N,) int labels -> uint8 (N, H, W, 3)."""
        from pipeline.generate import generate_images

        labels = np.asarray(model_input).reshape(-1)
        num_classes = self.card["num_classes"]
        in_range = labels.size == 0 or 0 <= labels.min() <= labels.max() < num_classes
        if not np.issubdtype(labels.dtype, np.integer) or not in_range:
            raise ValueError(f"inputs must be integer class labels in [0, {num_classes}), got {labels.tolist()}")
        s = {**self.defaults, **(params or {})}
        return generate_images(
            self.model, self.vae, labels.astype(np.int64), np.arange(len(labels), dtype=np.int64),
            seed=int(s["seed"]), sampler=str(s["sampler"]), steps=int(s["steps"]), cfg_scale=float(s["cfg_scale"]),
            cfg_channels=self.defaults["cfg_channels"], num_classes=num_classes, device=self.device,
            latent_shape=tuple(self.card["latent_shape"]), batch_size=int(self.defaults["batch_size"]),
            micro_batch=int(self.defaults["micro_batch"]),  # fixes the pixels, as in the sample stage
            precision=str(self.defaults["precision"]), diffusion=self.diffusion,
        )


def requirements() -> list[str]:
    return ["torch>=2.4", *(f"{name}=={installed_version(name)}" for name in PINNED)]


def image_size(dit_dir: str | Path, vae_dir: str | Path) -> tuple[int, int]:
    """(H, W) of the decoded images: the latent size times the VAE's downsample factor (one per extra block)."""
    card = read_model_json(dit_dir)
    vae_config = json.loads((Path(vae_dir) / "config.json").read_text())
    downsample = 2 ** (len(vae_config["block_out_channels"]) - 1)
    _, h, w = card["latent_shape"]
    return h * downsample, w * downsample


def log_pyfunc(dit_dir: str | Path, vae_dir: str | Path, sampler_defaults: dict):
    """Log the model into the active run; returns MLflow's ModelInfo (`model_uri` is models:/<model_id>).
    `sampler_defaults` holds SAMPLER_KEYS (the sample stage's settings)."""
    from mlflow.models import infer_signature

    missing = [k for k in SAMPLER_KEYS if k not in sampler_defaults]
    if missing:
        raise ValueError(f"sampler_defaults lacks {missing}; pass the sample section's {list(SAMPLER_KEYS)}")
    card = read_model_json(dit_dir)
    h, w = image_size(dit_dir, vae_dir)
    example = np.arange(min(2, card["num_classes"]), dtype=np.int64)  # (2,) labels
    signature = infer_signature(example, np.zeros((len(example), h, w, 3), np.uint8),
                                params={k: sampler_defaults[k] for k in PARAM_KEYS})
    with tempfile.TemporaryDirectory() as tmp:  # never write into another stage's DVC output
        sampler_file = Path(tmp) / "sampler_defaults.json"
        sampler_file.write_text(json.dumps({k: sampler_defaults[k] for k in SAMPLER_KEYS}, indent=2))
        return mlflow.pyfunc.log_model(
            name=ARTIFACT_PATH,
            python_model=str(Path(__file__).resolve()),  # models from code: see the module docstring
            artifacts={"dit": str(dit_dir), "vae": str(vae_dir), "sampler": str(sampler_file)},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature,
            input_example=example,
            pip_requirements=requirements(),
        )


# Models from code: the model MLflow builds when it runs this file (at log and at load time). Importing the module
# elsewhere only fills MLflow's "model from code" slot, which nothing else here reads.
mlflow.models.set_model(DiTImageModel())
