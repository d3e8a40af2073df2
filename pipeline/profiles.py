"""Profiles: named overlays on params.yaml for real work, run as DVC experiments.

`profiles/<name>.yaml` holds only the keys that differ from the offline default. This module checks every key
against params.yaml (an unknown key fails, naming the allowed ones) and prints them as `dvc exp run -S` overrides:

    dvc exp run -n cifar10 $(python -m pipeline.profiles cifar10)      # what `make exp PROFILE=cifar10` runs
    dvc exp run --queue -n cifar10 $(python -m pipeline.profiles cifar10)

Overrides keep params.yaml the single source of truth: each experiment records the full, resolved params.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ParamsError, read_yaml

PROFILE_DIR = Path("profiles")


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
    if isinstance(value, (bool, int, float, list)):
        return json.dumps(value, separators=(",", ":"))
    text = str(value)
    if any(c.isspace() for c in text):
        raise ParamsError(f"profile value {text!r} contains whitespace, which `dvc exp run -S` cannot carry")
    return text


def overrides(name: str, params_path: str | Path = "params.yaml", profile_dir: str | Path = PROFILE_DIR) -> list[str]:
    flat = flatten(load_profile(name, profile_dir), read_yaml(params_path))
    return [f"{key}={format_value(value)}" for key, value in flat.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.profiles", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="profile name (profiles/<name>.yaml); omit to list them")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    if args.name is None:
        print("\n".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))))
        return
    print(" ".join(f"-S {o}" for o in overrides(args.name, args.params)))


if __name__ == "__main__":
    from pipeline.errors import run_main

    run_main(main)
