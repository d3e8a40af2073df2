"""The trained DiT + VAE as an MLflow pyfunc model that turns class labels into images.

Contract of `predict`:
- input: a 1-D int64 array of class labels in [0, num_classes), shape (N,);
- params (all optional; their defaults are the sample stage's settings at registration, stored in the signature):
  `seed` (int), `cfg_scale` (float), `steps` (int), `sampler` ("ddpm" | "ddim" | "dpm-solver++");
- output: uint8 RGB images, shape (N, H, W, 3). Image i is seeded from (seed, i) exactly as sample i of the sample
  stage, so a call is deterministic and image i does not depend on N.
- bounds (pipeline/serving.py): at most `register.max_labels_per_request` labels (recorded with the model), steps
  within what the sampler supports, a finite cfg_scale >= 0, a seed in [0, 2**63 - 1]. A request outside them is
  refused before any generation with `MlflowException(INVALID_PARAMETER_VALUE)`: HTTP 400 whose `message` ends with
  one sentence naming the bound. The signature has no input schema on purpose: MLflow would cast the labels to
  int64 before `predict` sees them (0.5 -> 0, true -> 1), so the labels' type is checked here.
- one generation at a time per process: `precision.float32_mode` flips process-wide TF32 switches and restores them
  afterwards, so overlapping requests would change each other's numerics; serialising also keeps the memory of
  one request's images at a time. (`mlflow models serve` runs each request in a thread of one process.)

Served with `mlflow models serve -m models:/NAME@champion --env-manager local -p 5001`, a POST to /invocations of
`{"inputs": [3, 7], "params": {"seed": 1}}` answers `{"predictions": [...]}`: nested lists of shape (N, H, W, 3).

Nothing is pickled. The artifacts are files: models/dit (ema.pt, a flat state_dict, and model.json), the VAE's
save_pretrained snapshot, sampler_defaults.json and serving_limits.json. The model itself is logged "from code":
MLflow stores this file and, to load, runs it and takes the model passed to `set_model` at the bottom;
`load_context` then reads the files.
The `pipeline` package travels as code too, so loading needs no install of this repository.
"""

from __future__ import annotations

import json
import tempfile
import threading
from importlib.metadata import version as installed_version
from pathlib import Path

import mlflow
import numpy as np

from pipeline.formats.model_card import read_model_json
from pipeline.serving import LIMITS_FILE, RequestError, check_request, read_limits, write_limits

PACKAGE_DIR = Path(__file__).resolve().parent
ARTIFACT_PATH = "model"  # the LoggedModel's name inside the run
SAMPLER_KEYS = (
    "seed",
    "sampler",
    "steps",
    "cfg_scale",
    "cfg_channels",
    "batch_size",
    "micro_batch",
    "precision",
)  # as `sample`
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
        self.max_labels = read_limits(context.artifacts.get("limits", ""))["max_labels_per_request"]
        self.generating = threading.Lock()  # see the module docstring: one generation at a time

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        """(N,) int labels -> uint8 (N, H, W, 3)."""
        from mlflow.exceptions import MlflowException

        from pipeline.generate import generate_images

        try:
            r = check_request(
                model_input,
                params,
                self.defaults,
                num_classes=self.card["num_classes"],
                max_labels=self.max_labels,
                diffusion_steps=self.diffusion["diffusion_steps"],
            )
        except RequestError as e:
            raise MlflowException.invalid_parameter_value(str(e)) from None  # HTTP 400, no traceback
        with self.generating:
            return generate_images(
                self.model,
                self.vae,
                r.labels,
                np.arange(len(r.labels), dtype=np.int64),
                seed=r.seed,
                sampler=r.sampler,
                steps=r.steps,
                cfg_scale=r.cfg_scale,
                cfg_channels=self.defaults["cfg_channels"],
                num_classes=self.card["num_classes"],
                device=self.device,
                latent_shape=tuple(self.card["latent_shape"]),
                batch_size=int(self.defaults["batch_size"]),
                micro_batch=int(self.defaults["micro_batch"]),  # fixes the pixels, as in the sample stage
                precision=str(self.defaults["precision"]),
                diffusion=self.diffusion,
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


def log_pyfunc(dit_dir: str | Path, vae_dir: str | Path, sampler_defaults: dict, max_labels_per_request: int):
    """Log the model into the active run; returns MLflow's ModelInfo (`model_uri` is models:/<model_id>).
    `sampler_defaults` holds SAMPLER_KEYS (the sample stage's settings); `max_labels_per_request` bounds each
    request (recorded with the model)."""
    from mlflow.models import ModelSignature, infer_signature

    missing = [k for k in SAMPLER_KEYS if k not in sampler_defaults]
    if missing:
        raise ValueError(f"sampler_defaults lacks {missing}; pass the sample section's {list(SAMPLER_KEYS)}")
    card = read_model_json(dit_dir)
    h, w = image_size(dit_dir, vae_dir)
    example = np.arange(min(2, card["num_classes"]), dtype=np.int64)  # (2,) labels
    inferred = infer_signature(
        example, np.zeros((len(example), h, w, 3), np.uint8), params={k: sampler_defaults[k] for k in PARAM_KEYS}
    )
    # No input schema: predict checks the labels' type itself (see the module docstring).
    signature = ModelSignature(inputs=None, outputs=inferred.outputs, params=inferred.params)
    with tempfile.TemporaryDirectory() as tmp:  # never write into another stage's DVC output
        sampler_file = Path(tmp) / "sampler_defaults.json"
        sampler_file.write_text(json.dumps({k: sampler_defaults[k] for k in SAMPLER_KEYS}, indent=2))
        limits_file = write_limits(Path(tmp) / LIMITS_FILE, max_labels_per_request)
        return mlflow.pyfunc.log_model(
            name=ARTIFACT_PATH,
            python_model=str(Path(__file__).resolve()),  # models from code: see the module docstring
            artifacts={
                "dit": str(dit_dir),
                "vae": str(vae_dir),
                "sampler": str(sampler_file),
                "limits": str(limits_file),
            },
            code_paths=[str(PACKAGE_DIR)],
            signature=signature,
            input_example=example,
            pip_requirements=requirements(),
        )


# Models from code: the model MLflow builds when it runs this file (at log and at load time). Importing the module
# elsewhere only fills MLflow's "model from code" slot, which nothing else here reads.
mlflow.models.set_model(DiTImageModel())
