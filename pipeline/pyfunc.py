"""The trained DiT + VAE as an MLflow pyfunc model that turns class labels into images.

Contract of `predict`:
- input: a 1-D int64 array of class labels, shape (N,);
- params (all optional, defaults from the sample stage's settings at registration): `seed` (int), `cfg_scale`
  (float), `steps` (int), `sampler` ("ddpm" | "ddim" | "dpm-solver++");
- output: uint8 images, shape (N, H, W, 3), RGB. Image i is seeded from (seed, i), so a call is deterministic.

Served with `mlflow models serve -m models:/NAME@champion --env-manager local`, a POST to /invocations with
`{"inputs": [3, 7], "params": {"seed": 1}}` answers `{"predictions": [[[[r, g, b], ...]]]}` (nested lists of uint8).
The weights travel as files (state_dict + safetensors snapshot); no torch module is pickled.
"""
from __future__ import annotations

import json
import tempfile
from importlib.metadata import version as installed_version
from pathlib import Path

import mlflow
import numpy as np

PACKAGE_DIR = Path(__file__).resolve().parent


class DiTImageModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch

        from pipeline.sample import load_dit
        from pipeline.vae import load_vae

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.model_info = load_dit(context.artifacts["dit"], self.device)
        self.vae = load_vae(context.artifacts["vae"], self.device)
        self.defaults = json.loads(Path(context.artifacts["sampler"]).read_text())

    def predict(self, context, model_input, params=None) -> np.ndarray:
        from pipeline.sample import generate_images

        labels = np.asarray(model_input, dtype=np.int64).reshape(-1)
        num_classes = self.model_info["num_classes"]
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"class labels must lie in [0, {num_classes}), got {labels.tolist()}")
        settings = {**self.defaults, **(params or {})}
        return generate_images(
            self.model, self.vae, labels, np.arange(len(labels), dtype=np.int64),
            seed=int(settings["seed"]), sampler=str(settings["sampler"]), steps=int(settings["steps"]),
            cfg_scale=float(settings["cfg_scale"]), cfg_channels=self.defaults["cfg_channels"],
            num_classes=num_classes, latent_shape=tuple(self.model_info["latent_shape"]), device=self.device,
            batch_size=int(self.defaults["batch_size"]),
        )


def _requirements() -> list[str]:
    pins = [f"{name}=={installed_version(name)}" for name in ("diffusers", "numpy", "safetensors", "pyyaml")]
    return ["torch>=2.4", *pins]  # torch is left open: the serving host brings its own CUDA build


def log_pyfunc(dit_dir: str | Path, vae_dir: str | Path, sampler_defaults: dict):
    """Log into the active run; returns MLflow's ModelInfo. `sampler_defaults`: seed, sampler, steps, cfg_scale,
    cfg_channels, batch_size."""
    from mlflow.models import infer_signature

    model_json = json.loads((Path(dit_dir) / "model.json").read_text())
    h = w = model_json["image_size"]
    example = np.array([0, min(1, model_json["num_classes"] - 1)], dtype=np.int64)
    params = {k: sampler_defaults[k] for k in ("seed", "cfg_scale", "steps", "sampler")}
    signature = infer_signature(example, np.zeros((2, h, w, 3), dtype=np.uint8), params=params)
    with tempfile.TemporaryDirectory() as tmp:  # never write into another stage's DVC output
        sampler_file = Path(tmp) / "sampler_defaults.json"
        sampler_file.write_text(json.dumps(sampler_defaults, indent=2))
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=DiTImageModel(),
            artifacts={"dit": str(dit_dir), "vae": str(vae_dir), "sampler": str(sampler_file)},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature,
            input_example=example,
            pip_requirements=_requirements(),
        )
