"""The `curve` stage: FID over training, from every checkpoint the train stage kept (paper Figs. 5, 6 and 8).

For each `models/checkpoints/ckpt-*.pt`, oldest first, the EMA weights are rebuilt from the checkpoint's own
model_config (generate.build_dit: no architecture is declared here), `curve.num_samples` images are drawn with the
curve's sampler settings and the checkpoint's own diffusion by generate.generate_images and scored against
data/reference with the reference's own extractor (metrics.evaluate_images). Image i comes from (seed, i) with label
i % num_classes, so every checkpoint of every experiment sees the same noise and labels: differences between points
are the models', not the draws'.

The protocol is cheaper than the headline sample + evaluate stages (fewer samples and steps; no guidance, as the
paper's training curves), so its FIDs compare with one another at one protocol, not with metrics/eval.json.

Outputs: reports/curve.json, the record (one entry per checkpoint in `steps`, `fid`, `class_consistency`, `kid`,
`precision`, `recall`; the final values; the model's name, conditioning, patch size, forward Gflops per image
(pipeline.flops) and parameters; the protocol); metrics/curve.json, the numbers to compare across experiments (the
last checkpoint's step and metrics, Gflops, parameters); plots/curve.csv (step, fid, class_consistency, kid); and
plots/curve_fid.png, its FID as an image that `dvc plots show` renders offline.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.artifacts import ArtifactError, atomic_write, atomic_write_json, sha256_dir
from pipeline.autoencoder import load_vae
from pipeline.checkpoints import RESUME_KEYS, list_checkpoints, load_checkpoint
from pipeline.features import load_extractor, select_device
from pipeline.flops import build_on_meta, count_gflops_latent
from pipeline.formats.model_card import read_diffusion
from pipeline.formats.reference_stats import load_reference
from pipeline.generate import build_dit, generate_images, make_labels
from pipeline.metrics import evaluate_images
from pipeline.model import DiT
from pipeline.params.curve import CurveParams
from pipeline.params.evaluate import EvaluateParams
from pipeline.plots import line_plot

LABELS = "balanced"  # label of sample i = i % num_classes: every class equally often at every point
POINT_METRICS = ("fid", "class_consistency", "kid", "precision", "recall")  # per checkpoint, in curve.json
CSV_COLUMNS = ("step", "fid", "class_consistency", "kid")
# Config keys that change no forward multiply-accumulate: the label embedding is a lookup, dropout is off at
# inference, and activation checkpointing only re-runs the forward in training.
FLOPS_NEUTRAL_KEYS = ("num_classes", "class_dropout_prob", "activation_checkpointing")


# --- the run's description --------------------------------------------------------------------------------------


def check_same_run(ckpt: dict, path: Path, final: dict) -> None:
    """Every point of a curve must come from one training run: same model, trajectory params and latents."""
    why = [f"train.{k}" for k in RESUME_KEYS if ckpt["train_params"].get(k) != final["train_params"].get(k)]
    why += [
        f"model.{k}"
        for k, v in final["model_config"].items()
        if k != "activation_checkpointing" and ckpt["model_config"].get(k) != v
    ]  # may change on resume
    why += ["latents"] if ckpt["latents_sha256"] != final["latents_sha256"] else []
    if why:
        raise ArtifactError(
            f"{path} comes from another run than the latest checkpoint (differs in {why}); "
            f"delete {path.parent} and rerun `dvc repro train`"
        )


def preset_gflops(name: str, config: dict) -> float:
    """Forward Gflops per image (paper Table 1 convention, pipeline.flops) of preset `name` at the checkpoint's
    latent size and conditioning, after checking that the preset counted there is the checkpoint's architecture."""
    counted = build_on_meta(name, config["input_size"], config["conditioning"]).config
    differ = sorted(k for k in config if k not in FLOPS_NEUTRAL_KEYS and counted[k] != config[k])
    if differ:
        raise ArtifactError(
            f"the checkpoints' model is not the preset {name!r} that pipeline.flops counts (differs "
            f"in {differ}: {[config[k] for k in differ]} vs {[counted[k] for k in differ]}); "
            "Gflops are defined for the named presets only"
        )
    return count_gflops_latent(name, config["input_size"], config["conditioning"])


def describe_model(final: dict) -> dict:
    """Name, architecture, forward Gflops and parameters (the frozen pos_embed included) of the run's model."""
    config, name = final["model_config"], final["train_params"]["model"]
    with torch.device("meta"):  # shapes only
        params = sum(q.numel() for q in DiT.from_config(config).parameters())
    return {
        "model": name,
        "conditioning": config["conditioning"],
        "patch_size": config["patch_size"],
        "depth": config["depth"],
        "hidden_size": config["hidden_size"],
        "latent_size": config["input_size"],
        "tokens": (config["input_size"] // config["patch_size"]) ** 2,
        "gflops": preset_gflops(name, config),
        "params_M": params / 1e6,
    }


# --- one point ----------------------------------------------------------------------------------------------------


def evaluate_checkpoint(
    path: Path, ckpt: dict, vae, reference, extractor, p: CurveParams, eval_params: EvaluateParams, device: torch.device
) -> dict:
    """Metrics of checkpoint `path`'s EMA on `p.num_samples` seeded samples (all of evaluate_images' output)."""
    config = ckpt["model_config"]
    card = {"model": ckpt["train_params"]["model"], "model_kwargs": config, "checkpoint": str(path)}
    model = build_dit(card, device)  # takes the checkpoint's `ema` entry, loaded strictly
    indices = np.arange(p.num_samples, dtype=np.int64)
    labels = make_labels(LABELS, indices, config["num_classes"], p.seed)
    latent_shape = (config["in_channels"], config["input_size"], config["input_size"])
    diffusion = read_diffusion(ckpt, str(path), fix=f"delete {path.parent} and rerun `dvc repro train`")
    images = generate_images(
        model,
        vae,
        labels,
        indices,
        seed=p.seed,
        sampler=p.sampler,
        steps=p.steps,
        cfg_scale=p.cfg_scale,
        cfg_channels=p.cfg_channels,
        num_classes=config["num_classes"],
        latent_shape=latent_shape,
        device=device,
        batch_size=p.batch_size,
        micro_batch=p.micro_batch,
        precision=p.precision,
        diffusion=diffusion,
    )
    return evaluate_images(images, labels, reference, extractor, eval_params)  # (N, H, W, 3) uint8 -> metrics


# --- the stage ----------------------------------------------------------------------------------------------------


def run_curve(
    p: CurveParams,
    eval_params: EvaluateParams,
    checkpoints_dir: str | Path,
    reference_dir: str | Path,
    vae_dir: str | Path,
    official_checkpoint: str | None,
) -> dict:
    """The curve of the run in `checkpoints_dir` (the metrics/curve.json record). With `official_checkpoint` (the
    train stage imported weights instead of training) there are no checkpoints, and the record says so."""
    paths = list_checkpoints(checkpoints_dir)
    if official_checkpoint is not None:
        return skipped_record(
            f"train.official_checkpoint {official_checkpoint} was imported, not trained: there is no training curve", p
        )
    if not paths:
        raise ArtifactError(f"no checkpoints in {checkpoints_dir}; run `dvc repro train`")
    final = load_checkpoint(paths[-1])
    model = describe_model(final)
    device = select_device(p.use_gpu, "curve")
    reference, extractor = load_reference(reference_dir), load_extractor(reference_dir, device)
    vae = load_vae(vae_dir, device)
    points, steps = [], []
    for path in tqdm(paths, desc="curve", unit="ckpt"):
        ckpt = load_checkpoint(path)  # memory-mapped: only the EMA tensors are read
        check_same_run(ckpt, path, final)
        points.append(evaluate_checkpoint(path, ckpt, vae, reference, extractor, p, eval_params, device))
        steps.append(ckpt["step"])
        tqdm.write(f"[curve] step {steps[-1]}: FID {points[-1]['fid']:.2f}")
    protocol = {
        **sampling_protocol(p),
        **points[-1]["protocol"],
        "vae_sha256": sha256_dir(vae_dir),
        "latents_sha256": final["latents_sha256"],
    }
    return {
        **series(steps, points),
        **model,
        "checkpoints": [f.name for f in paths],
        "mlflow_run_id": final["mlflow_run_id"],
        "protocol": protocol,
        "notes": points[-1]["notes"],
    }


def sampling_protocol(p: CurveParams) -> dict:
    return {
        "num_samples": p.num_samples,
        "sampler": p.sampler,
        "sampling_steps": p.steps,
        "cfg_scale": p.cfg_scale,
        "cfg_channels": p.cfg_channels,
        "labels": LABELS,
        "sample_seed": p.seed,
        "micro_batch": p.micro_batch,
        "precision": p.precision,
    }


def series(steps: list[int], points: list[dict]) -> dict:
    """Per-checkpoint lists (`steps` are training steps) and the final point's values."""
    out = {"steps": steps, **{k: [point[k] for point in points] for k in POINT_METRICS}}
    last = points[-1] if points else {}
    out.update(
        {
            "final_step": steps[-1] if steps else None,
            "final_fid": last.get("fid"),
            "final_class_consistency": last.get("class_consistency"),
        }
    )
    return out


def skipped_record(reason: str, p: CurveParams) -> dict:
    return {
        **series([], []),
        "model": None,
        "conditioning": None,
        "gflops": None,
        "params_M": None,
        "checkpoints": [],
        "protocol": sampling_protocol(p),
        "notes": {"curve": reason},
    }


def curve_metrics(record: dict) -> dict:
    """The numbers of metrics/curve.json: the last checkpoint's step and metrics, the model's Gflops and parameters
    (millions). Absent, not null, where there is no value (no checkpoint; class consistency with Inception)."""
    last = {k: record[k][-1] for k in POINT_METRICS} if record["steps"] else {}
    numbers = {"steps": record["final_step"], **last, "gflops": record["gflops"], "params_M": record["params_M"]}
    return {k: v for k, v in numbers.items() if v is not None}


def write_outputs(
    record: dict,
    metrics_path: str | Path,
    report_path: str | Path,
    plots_path: str | Path,
    plot_image_path: str | Path | None = None,
) -> None:
    """metrics/curve.json (curve_metrics), reports/curve.json (the whole record), plots/curve.csv with one row
    per checkpoint (empty cells for null metrics), and its FID as a PNG at `plot_image_path` when given."""
    atomic_write_json(metrics_path, curve_metrics(record))
    atomic_write_json(report_path, record)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for i, step in enumerate(record["steps"]):
        writer.writerow({"step": step, **{k: record[k][i] for k in CSV_COLUMNS[1:]}})
    atomic_write(plots_path, lambda tmp: tmp.write_text(buf.getvalue()))
    if plot_image_path:
        write_fid_plot(record, plot_image_path)


def write_fid_plot(record: dict, path: str | Path) -> None:
    """`path`: FID over training steps, one point per checkpoint, as a PNG (pipeline/plots.py)."""
    protocol = record["protocol"]  # in the label: these FIDs compare with one another, not with metrics/eval.json
    model = f" ({record['model']})" if record["model"] else ""
    line_plot(
        path,
        record["steps"],
        {"fid": record["fid"]},
        title=f"FID over training{model}",
        xlabel="training steps",
        ylabel=f"FID ({protocol['num_samples']} samples, {protocol['sampling_steps']} "
        f"steps, cfg {protocol['cfg_scale']})",
        empty="no training curve (train.official_checkpoint was imported)",
    )
