"""The `register` stage and the registry CLI: every evaluated model becomes a version; `champion` is the best.

Rules (`decide`):
- a version without the ranking metric is never champion;
- with no champion yet, an evaluated version becomes champion;
- otherwise it must be strictly better under the *same* evaluation protocol and the same reference statistics;
  results under a different protocol are never compared: the difference is recorded and nothing moves.

Every promotion is appended to the registered model's `champion_history` tag, so `rollback` can step back.

    python -m pipeline.registry show
    python -m pipeline.registry promote VERSION
    python -m pipeline.registry rollback
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.artifacts import atomic_write_json, require_file, sha256_file

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "champion_history"


@dataclass(frozen=True)
class RegisterParams:
    model_name: str
    metric: Literal["fid", "kid"]  # lower is better for both


@dataclass(frozen=True)
class Candidate:
    """What the promotion rule needs to know about a version."""
    version: str
    score: float | None
    protocol: dict[str, Any]


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(new: Candidate, champion: Candidate | None, metric: str) -> Decision:
    if new.score is None or not math.isfinite(new.score):
        return Decision(False, f"version {new.version} has no finite {metric}: an unevaluated model is never champion")
    if champion is None:
        return Decision(True, f"no champion yet: version {new.version} ({metric} {new.score:.4g}) becomes champion")
    if new.protocol != champion.protocol:
        diff = {k: (champion.protocol.get(k), new.protocol.get(k))
                for k in sorted(set(new.protocol) | set(champion.protocol))
                if new.protocol.get(k) != champion.protocol.get(k)}
        return Decision(False, f"protocol differs from champion v{champion.version}, not compared: "
                               + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()))
    if champion.score is None or new.score < champion.score:
        return Decision(True, f"{metric} {new.score:.4g} beats champion v{champion.version} ({champion.score})")
    return Decision(False, f"{metric} {new.score:.4g} does not beat champion v{champion.version} ({champion.score:.4g})")


# ---- the evaluation facts a version is tagged with ----

PROTOCOL_KEYS = ("num_samples", "sampler", "steps", "cfg_scale", "cfg_channels", "labels", "extractor", "mode",
                 "reference_sha256")


def protocol_of(evaluation: dict) -> dict[str, Any]:
    """The part of metrics/eval.json that must match for two FIDs to be comparable."""
    protocol = evaluation["protocol"]
    return {k: protocol.get(k) for k in PROTOCOL_KEYS}


def candidate_from_tags(version: str, tags: dict[str, str], metric: str) -> Candidate:
    score = tags.get(metric)
    protocol = json.loads(tags["protocol"]) if "protocol" in tags else {}
    return Candidate(version, float(score) if score not in (None, "", "None") else None, protocol)


# ---- MLflow side ----

def _client():
    import mlflow

    from pipeline.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient()


def _alias(client, name: str, alias: str):
    """The model version behind `alias`, or None when the alias (or the model) does not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _champion(client, name: str, metric: str) -> Candidate | None:
    mv = _alias(client, name, CHAMPION)
    return candidate_from_tags(mv.version, mv.tags, metric) if mv else None


def _history(client, name: str) -> list[str]:
    return json.loads(client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))


def set_champion(client, name: str, version: str) -> None:
    client.set_registered_model_alias(name, CHAMPION, version)
    history = _history(client, name)
    if not history or history[-1] != version:
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history + [version]))


def rollback(client, name: str) -> str:
    """Move `champion` back to the previous champion; returns that version."""
    history = _history(client, name)
    if len(history) < 2:
        raise SystemExit(f"'{name}' has no previous champion to roll back to (history: {history})")
    previous = history[-2]
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[:-1]))
    return previous


def promote(client, name: str, version: str, metric: str) -> None:
    """Manual promotion: allowed for any evaluated version, whatever its score."""
    tags = client.get_model_version(name, version).tags
    if candidate_from_tags(version, tags, metric).score is None:
        raise SystemExit(f"version {version} of '{name}' has no {metric}: evaluate it before promoting")
    set_champion(client, name, version)


def _existing_version(client, name: str, tags: dict[str, str]) -> str | None:
    """The version already registered for this checkpoint and this evaluation, if any (idempotent re-runs)."""
    query = f"name = '{name}' and tags.checkpoint_sha256 = '{tags['checkpoint_sha256']}'"
    for mv in client.search_model_versions(query):
        if mv.tags.get("eval_sha256") == tags["eval_sha256"]:
            return mv.version
    return None


def register(params: RegisterParams, dit_dir: str | Path, vae_dir: str | Path, eval_path: str | Path,
             images_dir: str | Path, latents_dir: str | Path, sampler_defaults: dict, out_metrics: str | Path) -> dict:
    """Log the pyfunc model into the training run, register a version, set `challenger`, maybe move `champion`."""
    import mlflow

    from pipeline.pyfunc import log_pyfunc
    from pipeline.tracking import run_tags

    dit_dir = Path(dit_dir)
    evaluation = json.loads(require_file(eval_path, "evaluate").read_text())
    model_json = json.loads(require_file(dit_dir / "model.json", "train").read_text())
    run_id = json.loads(require_file(dit_dir / "tracking.json", "train").read_text()).get("mlflow_run_id")
    metric_value = evaluation["metrics"].get(params.metric)
    tags = {
        "fid": evaluation["metrics"].get("fid"), "kid": evaluation["metrics"].get("kid"),
        "protocol": json.dumps(protocol_of(evaluation), sort_keys=True),
        "checkpoint_sha256": model_json["ema_sha256"], "eval_sha256": sha256_file(eval_path),
        "dataset_sha256": sha256_file(require_file(Path(images_dir) / "manifest.json", "ingest")),
        "latents_sha256": sha256_file(require_file(Path(latents_dir) / "manifest.json", "encode")),
        **run_tags(),
    }
    tags = {k: str(v) for k, v in tags.items()}
    client = _client()
    version = _existing_version(client, params.model_name, tags)
    if version is None:
        with mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name="register"):
            info = log_pyfunc(dit_dir, vae_dir, sampler_defaults)
        mv = mlflow.register_model(info.model_uri, params.model_name, tags=tags)
        version = mv.version
    champion_before = _champion(client, params.model_name, params.metric)
    client.set_registered_model_alias(params.model_name, CHALLENGER, version)
    new = Candidate(version, float(metric_value) if metric_value is not None else None, protocol_of(evaluation))
    decision = (Decision(False, f"version {version} is already champion") if champion_before
                and champion_before.version == version else decide(new, champion_before, params.metric))
    if decision.promote:
        set_champion(client, params.model_name, version)
    result = {
        "model_name": params.model_name, "version": int(version), "promoted": decision.promote,
        "reason": decision.reason, params.metric: metric_value,
        "champion_version": int(version) if decision.promote else (
            int(champion_before.version) if champion_before else None),
    }
    atomic_write_json(out_metrics, result)
    print(f"[register] {params.model_name} v{version}: {decision.reason}")
    return result


def show(client, name: str, metric: str) -> None:
    aliases = {alias: getattr(_alias(client, name, alias), "version", None) for alias in (CHAMPION, CHALLENGER)}
    print(f"{name}: champion=v{aliases[CHAMPION]} challenger=v{aliases[CHALLENGER]} history={_history(client, name)}")
    for mv in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda m: int(m.version)):
        protocol = json.loads(mv.tags.get("protocol", "{}"))
        print(f"  v{mv.version}: {metric}={mv.tags.get(metric)} sampler={protocol.get('sampler')} "
              f"steps={protocol.get('steps')} cfg={protocol.get('cfg_scale')} n={protocol.get('num_samples')} "
              f"run={mv.run_id} exp={mv.tags.get('dvc_experiment', '-')}")


def main(argv: list[str] | None = None) -> None:
    from pipeline.config import load_section

    parser = argparse.ArgumentParser(prog="python -m pipeline.registry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--name", help="registered model name (default: register.model_name in params)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("show")
    sub.add_parser("promote").add_argument("version")
    sub.add_parser("rollback")
    args = parser.parse_args(argv)
    params = load_section(RegisterParams, "register", args.params)
    name = args.name or params.model_name
    client = _client()
    if args.command == "show":
        show(client, name, params.metric)
    elif args.command == "promote":
        promote(client, name, args.version, params.metric)
        print(f"{name}: champion -> v{args.version}")
    else:
        print(f"{name}: champion -> v{rollback(client, name)}")


if __name__ == "__main__":
    main()
