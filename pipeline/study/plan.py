"""The study plan (sweeps/study-plan.yaml) as a list of runs, each one `dvc exp` experiment, and its time estimate.

A training run trains one (model, conditioning, seed) and runs up to `curve` and `evaluate`: the FID curve over the
kept checkpoints and the final point (sample + evaluate). A sampling run changes only sample.* keys of a training
run (the guidance study's cfg scales, the sampling-compute study's DDPM step counts): it is an experiment too, run on
top of its training run's lock so that `train` is not repeated (pipeline.study.sweep). Names say what runs:
`Ti-p2-adaLN-Zero-s0`, `Ti-p2-adaLN-Zero-s0-cfg1p5`, `8x256-p2-adaLN-Zero-s0-ddpm250`.

Runs come in the order the runner takes them: seed by seed, the DiT-Ti/2 adaLN-Zero reference first and its
sampling runs right after it (so the learning-regime check, cfg 1.5, lands early), then the other variants.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.flops import count_gflops_latent, count_parameters
from pipeline.params.load import ParamsError, read_yaml
from pipeline.profiles import apply, format_value, validate

PLAN_FILE = Path("sweeps/study-plan.yaml")
REFERENCE_CONDITIONING = "adaLN-Zero"
TRAIN_TARGETS = ("curve", "evaluate")
SAMPLING_TARGETS = ("evaluate",)


@dataclass(frozen=True)
class PlannedRun:
    name: str
    model: str  # a key of pipeline.model.DiT_models
    conditioning: str
    seed: int  # train.seed
    studies: tuple[str, ...]  # the claims it is a point of
    sampling: dict = field(default_factory=dict)  # sample.* keys changed from the base (sampling runs only)
    base: str | None = None  # the training run whose model a sampling run samples

    @property
    def kind(self) -> str:
        return "train" if self.base is None else "sampling"

    @property
    def targets(self) -> tuple[str, ...]:
        return TRAIN_TARGETS if self.base is None else SAMPLING_TARGETS

    def overrides(self, plan: dict) -> dict:
        """Every -S key of this run: the pinned base, the variant, the sampling keys."""
        return {
            **plan["base"],
            "train.model": self.model,
            "train.conditioning": self.conditioning,
            "train.seed": self.seed,
            **{f"sample.{k}": v for k, v in self.sampling.items()},
        }

    def set_args(self, plan: dict, params: dict) -> list[str]:
        """`-S key=value` for the overrides that differ from `params` (the workspace's params.yaml): DVC rewrites
        every key it is given, and writes a float such as 1.0e-6 back as 1e-06, which PyYAML reads as a string."""
        changed = {k: v for k, v in self.overrides(plan).items() if lookup(params, k) != v}
        for key, value in changed.items():
            if isinstance(value, float) and "e" in repr(value) and "." not in repr(value).split("e")[0]:
                raise ParamsError(
                    f"{key}={value!r}: `dvc exp run -S` would write it as {value!r}, which params.yaml's "
                    "reader takes for a string; set it in params.yaml instead"
                )
        return [a for key, value in changed.items() for a in ("-S", f"{key}={format_value(value)}")]


def lookup(params: dict, dotted: str):
    node = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return KeyError  # a sentinel no plan value equals
        node = node[key]
    return node


def run_name(model: str, conditioning: str, seed: int) -> str:
    """DiT-Ti/2 adaLN-Zero seed 0 -> Ti-p2-adaLN-Zero-s0 (a valid git ref name, as DVC requires)."""
    size, patch = model.removeprefix("DiT-").split("/")
    return f"{size}-p{patch}-{conditioning}-s{seed}"


def number_tag(x: float) -> str:
    """1.5 -> 1p5, 4.0 -> 4 (no dots in experiment names)."""
    return f"{x:g}".replace(".", "p")


def load_plan(path: str | Path = PLAN_FILE, params_path: str | Path = "params.yaml", check: bool = True) -> dict:
    """The plan; with `check`, every run's overrides applied to params.yaml pass every stage's strict loader (the
    runner checks; the report, which only reads records, does not need to)."""
    plan = read_yaml(path)
    for key in ("name", "synthetic_version", "base", "seeds", "studies", "regime", "rule", "estimate"):
        if key not in plan:
            raise ParamsError(f"{path}: missing key '{key}'")
    plan["sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    plan["path"] = str(path)
    params = read_yaml(params_path) if check else None
    for run in expand(plan) if check else []:
        validate(apply(params, run.overrides(plan)), f"{params_path} + {path} run {run.name}")
    return plan


def _training_variants(studies: dict) -> dict[tuple[str, str], list[str]]:
    """{(model, conditioning): [studies]} in plan order, the reference first."""
    variants: dict[tuple[str, str], list[str]] = {}
    ref = (studies["conditioning"]["model"], REFERENCE_CONDITIONING)
    variants[ref] = []
    for study in ("size", "patch"):
        for model in studies[study]["models"]:
            variants.setdefault((model, REFERENCE_CONDITIONING), []).append(study)
    for cond in studies["conditioning"]["conditionings"]:
        variants.setdefault((studies["conditioning"]["model"], cond), []).append("conditioning")
    for (model, cond), tags in variants.items():
        if cond == REFERENCE_CONDITIONING:
            tags += ["gflops", "compute"]  # claims 4 and 5: every adaLN-Zero run
    return variants


def expand(plan: dict) -> list[PlannedRun]:
    """Every run of the plan, in the order the runner takes them."""
    studies = plan["studies"]
    samp, guid = studies["sampling"], studies["guidance"]
    runs = []
    for seed in plan["seeds"]:
        for (model, cond), tags in _training_variants(studies).items():
            base = run_name(model, cond, seed)
            if model == guid["model"] and cond == REFERENCE_CONDITIONING:
                tags = tags + ["guidance"]  # its cfg 1.0 final point
            runs.append(PlannedRun(base, model, cond, seed, tuple(tags)))
            if model == guid["model"] and cond == REFERENCE_CONDITIONING:
                for cfg in guid["cfg_scales"]:
                    runs.append(
                        PlannedRun(
                            f"{base}-cfg{number_tag(cfg)}",
                            model,
                            cond,
                            seed,
                            ("guidance",),
                            {"cfg_scale": cfg, "num_fid_samples": guid["num_fid_samples"]},
                            base,
                        )
                    )
            if model in samp["models"] and cond == REFERENCE_CONDITIONING and seed in samp["seeds"]:
                for steps in samp["steps"]:
                    runs.append(
                        PlannedRun(
                            f"{base}-{samp['sampler']}{steps}",
                            model,
                            cond,
                            seed,
                            ("sampling",),
                            {
                                "sampler": samp["sampler"],
                                "steps": steps,
                                "cfg_scale": samp["cfg_scale"],
                                "num_fid_samples": samp["num_fid_samples"],
                            },
                            base,
                        )
                    )
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ParamsError(f"the plan names a run twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return runs


# --- the time estimate --------------------------------------------------------------------------------------------


def latent_size(plan: dict) -> int:
    base = plan["base"]
    return base["ingest.image_size"] // 2 ** (len(base["vae.block_out_channels"]) - 1)


def model_shape(run: PlannedRun, plan: dict) -> dict:
    """Forward Gflops per image and parameters (M) of a run's model, counted on the meta device."""
    latent = latent_size(plan)
    return {
        "gflops": count_gflops_latent(run.model, latent, run.conditioning),
        "params_M": count_parameters(run.model, latent, run.conditioning) / 1e6,
    }


def estimate_s(run: PlannedRun, plan: dict, shapes: dict | None = None) -> float:
    """Seconds of one run on the idle 2-core machine, from the plan's `estimate` figures: a training step costs a
    fixed part plus a part linear in the batch's forward Gflops; sampling and the curve scale with forward Gflops from
    DiT-Ti/2's measured rates (x2 network evaluations with guidance)."""
    est, base = plan["estimate"], plan["base"]
    shapes = shapes if shapes is not None else {}
    for key in ((run.model, run.conditioning), ("DiT-Ti/2", REFERENCE_CONDITIONING)):
        if key not in shapes:
            shapes[key] = count_gflops_latent(key[0], latent_size(plan), key[1])
    gflops = shapes[(run.model, run.conditioning)]
    ratio = max(gflops / shapes[("DiT-Ti/2", REFERENCE_CONDITIONING)], est["min_cost_ratio"])
    sample = {**{k.removeprefix("sample."): v for k, v in base.items() if k.startswith("sample.")}, **run.sampling}
    evals = sample["num_fid_samples"] * sample["steps"] * (2 if sample["cfg_scale"] != 1.0 else 1)
    seconds = est["experiment_overhead_s"] + est["sample_fixed_s"] + est["evaluate_s"]
    seconds += evals * ratio / est["sample_evals_per_s"]
    if run.kind == "train":
        batch, steps = base["train.global_batch_size"], base["train.train_steps"]
        step_ms = est["train_ms_per_step_fixed"] + est["train_ms_per_gflop"] * gflops * batch
        seconds += steps * step_ms / 1e3 / est["train_stage_factor"]
        seconds += steps // base["train.ckpt_every"] * est["curve_s_per_point"] * ratio
    return seconds


def parts(runs: list[PlannedRun], plan: dict, hours: float) -> list[list[tuple[PlannedRun, float]]]:
    """The runs cut, in order, into parts of at most `hours` each (the data stages once per part: a fresh clone)."""
    shapes: dict = {}
    out, current, used = [], [], plan["estimate"]["data_stages_s"]
    for run in runs:
        s = estimate_s(run, plan, shapes)
        if current and used + s > hours * 3600:
            out.append(current)
            current, used = [], plan["estimate"]["data_stages_s"]
        current.append((run, s))
        used += s
    return out + ([current] if current else [])
