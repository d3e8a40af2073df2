"""Profiles: named overlays on params.yaml for real work, run as DVC experiments.

`profiles/<name>.yaml` holds only the keys that differ from the offline default. This module checks every key
against params.yaml (an unknown key fails, naming the allowed ones) and prints them as `dvc exp run -S` overrides:

    dvc exp run -n cifar10 $(python -m pipeline.profiles cifar10)      # what `make exp PROFILE=cifar10` runs
    dvc exp run --queue -n cifar10 $(python -m pipeline.profiles cifar10)

Overrides keep params.yaml the single source of truth: each experiment records the full, resolved params.

Before printing, the resolved params (params.yaml with the profile applied) pass every check a stage makes on its
own section (`validate`: strict types, then each section's cross-field rules, which live in its dataclass's
`__post_init__`), and one rule across sections: a GPU profile runs every stage that does work on the GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.model import CPU_SIZES
from pipeline.params.load import ParamsError, from_dict, read_yaml
from pipeline.provenance import local_input

PROFILE_DIR = Path("profiles")
CPU_MODEL_SIZES = tuple(f"DiT-{size}/" for size in CPU_SIZES)  # sized for a CPU; anything bigger makes a GPU profile
# Sections with a use_gpu switch, and the train settings under which a stage does no GPU work: with an official
# checkpoint, `train` only copies weights and `curve` has no checkpoints to score.
GPU_SECTIONS = ("encode", "train", "reference", "sample", "evaluate", "curve")
IDLE_WITH_OFFICIAL_CHECKPOINT = ("train", "curve")


def load_profile(name: str, profile_dir: str | Path = PROFILE_DIR) -> dict:
    path = Path(profile_dir) / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in Path(profile_dir).glob("*.yaml"))
        raise ParamsError(f"unknown profile '{name}'; known profiles: {', '.join(known) or 'none'}")
    return yaml.safe_load(path.read_text()) or {}


def flatten(overlay: dict, base: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of `overlay`, each checked to exist in `base` (the params.yaml tree)."""
    flat = {}
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if not isinstance(base, dict) or key not in base:
            allowed = ", ".join(base) if isinstance(base, dict) else "none (not a section)"
            raise ParamsError(f"profile key '{dotted}' is not in params.yaml; allowed here: {allowed}")
        if isinstance(value, dict) and isinstance(base[key], dict):
            flat.update(flatten(value, base[key], f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def format_value(value: Any) -> str:
    """A value in the override grammar DVC's `-S` parses (Hydra's): null, true, 1.0e-4, [16,32], DiT-XL/2."""
    if value is None:
        return "null"
    if isinstance(value, float):
        return _yaml_float(value)
    if isinstance(value, list):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, (bool, int)):
        return json.dumps(value)
    text = str(value)
    if any(c.isspace() for c in text):
        raise ParamsError(f"profile value {text!r} contains whitespace, which `dvc exp run -S` cannot carry")
    return text


def _yaml_float(value: float) -> str:
    """A float that YAML 1.1 (PyYAML, which reads params.yaml) reads back as a float: 1e-06 is a string there, so
    the mantissa gets a dot (1.0e-06), as params.yaml writes its small numbers."""
    text = repr(value)
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:
        return f"{mantissa}.0e{exponent}"
    return text


def section_classes() -> dict[str, type]:
    """Every params.yaml section and the dataclass its stage loads it into (imported here, not at the top: they
    pull in torch, Ray and MLflow)."""
    from pipeline.params.curve import CurveParams
    from pipeline.params.encode import EncodeParams
    from pipeline.params.evaluate import EvaluateParams
    from pipeline.params.ingest import IngestParams
    from pipeline.params.reference import ReferenceParams
    from pipeline.params.register import RegisterParams
    from pipeline.params.sample import SampleParams
    from pipeline.params.tracking import TrackingParams
    from pipeline.params.train import TrainParams
    from pipeline.params.vae import VAEParams

    return {
        "ingest": IngestParams,
        "vae": VAEParams,
        "encode": EncodeParams,
        "train": TrainParams,
        "reference": ReferenceParams,
        "sample": SampleParams,
        "evaluate": EvaluateParams,
        "curve": CurveParams,
        "register": RegisterParams,
        "tracking": TrackingParams,
    }


def apply(params: dict, flat: dict[str, Any]) -> dict:
    """params.yaml's tree with the dotted overrides set: what `dvc exp run -S` resolves."""
    params = copy.deepcopy(params)
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
    return params


def validate(params: dict, source: str) -> dict[str, Any]:
    """Every section through its stage's strict loader and cross-field checks, then the rules across sections.
    Returns the loaded sections; raises ParamsError naming the key."""
    classes = section_classes()
    missing = sorted(set(classes) - set(params))
    if missing:
        raise ParamsError(f"{source}: missing section '{missing[0]}'")
    loaded = {name: from_dict(cls, params[name], name, source) for name, cls in classes.items()}
    check_gpu_profile(params, source)
    return loaded


def is_gpu_profile(params: dict) -> bool:
    return any(params[s]["use_gpu"] for s in GPU_SECTIONS) or not params["train"]["model"].startswith(CPU_MODEL_SIZES)


def check_gpu_profile(params: dict, source: str) -> None:
    """A GPU profile must not leave a stage that does work on the CPU (e.g. a curve that samples DiT-XL/2 at 256 px
    on the CPU because the profile forgot its section)."""
    if not is_gpu_profile(params):
        return
    idle = IDLE_WITH_OFFICIAL_CHECKPOINT if local_input(params["train"]["official_checkpoint"]) else ()
    on_cpu = [s for s in GPU_SECTIONS if s not in idle and not params[s]["use_gpu"]]
    if on_cpu:
        raise ParamsError(
            f"{source}: a GPU profile (use_gpu somewhere, or train.model {params['train']['model']}) "
            f"would run '{on_cpu[0]}.use_gpu' false"
            + (f" (and {on_cpu[1:]})" if on_cpu[1:] else "")
            + f": set {on_cpu[0]}.use_gpu: true in the profile"
        )


def overrides(name: str, params_path: str | Path = "params.yaml", profile_dir: str | Path = PROFILE_DIR) -> list[str]:
    """The profile as `key=value` overrides, after validating params.yaml with them applied."""
    params = read_yaml(params_path)
    flat = flatten(load_profile(name, profile_dir), params)
    validate(apply(params, flat), f"{params_path} + profile {name}")
    return [f"{key}={format_value(value)}" for key, value in flat.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.profiles", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", nargs="?", help="profile name (profiles/<name>.yaml); omit to list them")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    if args.name is None:
        print("\n".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))))
        return
    try:
        printed = overrides(args.name, args.params, PROFILE_DIR)
    except ParamsError as e:  # a user's fix, not a bug: one line, and `make exp` stops before `dvc exp run`
        sys.exit(f"error: {e}")
    print(" ".join(f"-S {o}" for o in printed))


if __name__ == "__main__":
    from pipeline.errors import run_main

    run_main(main)
