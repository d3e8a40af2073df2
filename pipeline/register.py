"""The `register` stage and the registry CLI: every evaluated model becomes a version; `champion` is the best.

Rules (`decide`):
- a version without a finite ranking metric is never champion;
- with no champion yet, an evaluated version becomes champion;
- otherwise it must be strictly better under the *same* evaluation protocol (`protocol_of`: samples, sampler,
  steps, guidance, labels, feature extractor and the reference statistics' hash); results under a different
  protocol are never compared: the difference is recorded and nothing moves.

Each registration points `challenger` at its version; every promotion is appended to the registered model's
`champion_history` tag, so `rollback` can step back. Re-registering the same checkpoint with the same evaluation
returns the existing version (the stage is idempotent even when DVC reruns it).

The stage's record of what it did is reports/register.json (version, decision, reason): a record, not a metric.
With `tracking.enabled: false` the stage registers nothing and says so there (`registered: false` and the reason),
so that the rest of the pipeline still runs without MLflow.

    python -m pipeline.register show
    python -m pipeline.register promote VERSION
    python -m pipeline.register rollback
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts import ArtifactError, atomic_write_json, require_file, sha256_file
from pipeline.errors import UserError
from pipeline.params.register import RegisterParams
from pipeline.params.tracking import TrackingParams
from pipeline.registry_lock import registry_lock
from pipeline.tracking import public_uri, run_tags

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "champion_history"
# The facts of the evaluation protocol (reports/eval.json) that must be equal for two scores to be comparable. Not the
# checkpoint (that is what is compared), not the sampling seed (another draw of the same protocol).
PROTOCOL_KEYS = (
    "num_samples",
    "sampler",
    "steps",
    "cfg_scale",
    "cfg_channels",
    "labels",
    "extractor",
    "extractor_mode",
    "reference_stats_sha256",
)
METRIC_PROTOCOL_KEYS = {"fid": (), "kid": ("kid_subsets", "kid_subset_size")}  # KID also depends on its subsets


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
        diff = {
            k: (champion.protocol.get(k), new.protocol.get(k))
            for k in sorted(set(new.protocol) | set(champion.protocol))
            if new.protocol.get(k) != champion.protocol.get(k)
        }
        return Decision(
            False,
            f"protocol differs from champion v{champion.version}, not compared: "
            + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()),
        )
    if champion.score is None or new.score < champion.score:
        return Decision(True, f"{metric} {new.score:.4g} beats champion v{champion.version} ({champion.score})")
    return Decision(
        False, f"{metric} {new.score:.4g} does not beat champion v{champion.version} ({champion.score:.4g})"
    )


# ---- the evaluation facts a version is tagged with ----


def protocol_of(protocol: dict, metric: str) -> dict[str, Any]:
    """The part of an evaluation protocol (reports/eval.json's `protocol`) that must match for two scores of
    `metric` to be comparable; absent facts are None, so they differ from present ones."""
    return {k: protocol.get(k) for k in PROTOCOL_KEYS + METRIC_PROTOCOL_KEYS[metric]}


def score_of(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def candidate_from_tags(version: str, tags: dict[str, str], metric: str) -> Candidate:
    """A registered version as the rule sees it; a version without our tags has no score and no protocol."""
    protocol = json.loads(tags["protocol"]) if "protocol" in tags else {}
    score = float(tags[metric]) if metric in tags else None
    return Candidate(str(version), score, protocol_of(protocol, metric))


def read_evaluation(eval_path: str | Path, report_path: str | Path, checkpoint_sha256: str) -> dict:
    """The evaluate stage's numbers (metrics/eval.json) with their `protocol` (from reports/eval.json), checked to
    be the evaluation of this checkpoint."""
    evaluation = json.loads(require_file(eval_path, "evaluate").read_text())
    protocol = json.loads(require_file(report_path, "evaluate").read_text()).get("protocol")
    if not isinstance(protocol, dict):
        raise ArtifactError(f"{report_path} has no 'protocol' mapping; run `dvc repro evaluate`")
    if protocol.get("checkpoint_sha256") != checkpoint_sha256:
        raise ArtifactError(
            f"{report_path} evaluates checkpoint {str(protocol.get('checkpoint_sha256'))[:12]}, "
            f"not {checkpoint_sha256[:12]} (models/dit/ema.pt); run `dvc repro sample evaluate`"
        )
    return {**evaluation, "protocol": protocol}


def evaluation_sha256(eval_path: str | Path, report_path: str | Path) -> str:
    """One hash of the evaluation: its numbers and its protocol."""
    return hashlib.sha256((sha256_file(eval_path) + sha256_file(report_path)).encode()).hexdigest()


def version_tags(checkpoint_sha256: str, evaluation: dict, eval_sha256: str, images_dir, latents_dir) -> dict[str, str]:
    """FID, KID, the evaluation protocol, the data/latents/checkpoint/evaluation hashes, git commit, DVC experiment."""
    tags = {
        "fid": score_of(evaluation.get("fid")),
        "kid": score_of(evaluation.get("kid")),
        "protocol": json.dumps(evaluation["protocol"], sort_keys=True),
        "checkpoint_sha256": checkpoint_sha256,
        "eval_sha256": eval_sha256,
        "dataset_sha256": sha256_file(require_file(Path(images_dir) / "manifest.json", "ingest")),
        "latents_sha256": sha256_file(require_file(Path(latents_dir) / "manifest.json", "encode")),
        **run_tags(),
    }
    return {k: str(v) for k, v in tags.items() if v is not None}  # an absent metric is an absent tag


# ---- MLflow side ----


def _client():
    import mlflow

    from pipeline.tracking import check_store, tracking_uri

    check_store(tracking_uri())
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient()


def _registered(client, name: str):
    """The registered model, or None when it does not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _alias_version(client, name: str, alias: str) -> str | None:
    model = _registered(client, name)
    version = model.aliases.get(alias) if model else None
    return str(version) if version is not None else None


def _history(client, name: str) -> list[str]:
    model = _registered(client, name)
    if model is None:
        raise UserError(f"no registered model named '{name}' at {public_uri(client.tracking_uri)}")
    return json.loads(model.tags.get(HISTORY_TAG, "[]"))


def _candidate(client, name: str, version: str, metric: str) -> Candidate:
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_model_version(name, version).tags
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise UserError(f"'{name}' has no version {version!r} at {public_uri(client.tracking_uri)}") from e
        raise
    return candidate_from_tags(version, tags, metric)


def set_champion(client, name: str, version: str) -> None:
    client.set_registered_model_alias(name, CHAMPION, version)
    history = _history(client, name)
    if not history or history[-1] != version:
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history + [version]))


def rollback(client, name: str) -> str:
    """Move `champion` back to the previous champion; returns that version."""
    history = _history(client, name)
    current = _alias_version(client, name, CHAMPION)
    if history and current != history[-1]:
        raise UserError(
            f"'{name}'@{CHAMPION} is v{current}, but the champion history ends with v{history[-1]}: the "
            f"alias was moved outside this tool; use `promote VERSION` to choose the champion"
        )
    if len(history) < 2:
        raise UserError(f"'{name}' has no previous champion to roll back to (champion history: {history})")
    client.set_registered_model_alias(name, CHAMPION, history[-2])
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[:-1]))
    return history[-2]


def promote(client, name: str, version: str, metric: str) -> None:
    """Manual promotion: allowed for any evaluated version, whatever its score or protocol."""
    if _candidate(client, name, version, metric).score is None:
        raise UserError(f"version {version} of '{name}' has no {metric}: evaluate it before promoting")
    set_champion(client, name, version)


def _existing_version(client, name: str, tags: dict[str, str]) -> str | None:
    """The version already registered for this checkpoint and this evaluation, if any (idempotent re-runs)."""
    query = f"name = '{name}' and tags.checkpoint_sha256 = '{tags['checkpoint_sha256']}'"
    versions = [
        mv.version for mv in client.search_model_versions(query) if mv.tags.get("eval_sha256") == tags["eval_sha256"]
    ]
    return str(min(versions, key=int)) if versions else None


def log_and_register(
    tracking: TrackingParams,
    dit_dir,
    vae_dir,
    sampler_defaults: dict,
    max_labels_per_request: int,
    name: str,
    tags: dict[str, str],
):
    """Log the pyfunc model into the training run recorded in dit_dir/tracking.json and register it; returns the
    ModelVersion. A training run made with tracking off has no id: the model then goes to a new run, `register`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.pyfunc import log_pyfunc
    from pipeline.tracking import Tracker

    run_id = json.loads(require_file(Path(dit_dir) / "tracking.json", "train").read_text())["mlflow_run_id"]
    tracker = Tracker(tracking, run_id)
    if run_id is None:
        print(
            f"[register] {dit_dir}/tracking.json records no training run (train ran with tracking off): "
            "logging the model into a new run 'register'"
        )
        tracker.start("register", params={}, tags={}, system_metrics=False)
    else:
        try:
            mlflow.MlflowClient().get_run(run_id)
        except MlflowException as e:
            raise ArtifactError(
                f"the training run {run_id} recorded in {dit_dir}/tracking.json is not in the "
                f"tracking store {public_uri(tracker.uri)} ({e.error_code}); point "
                "MLFLOW_TRACKING_URI at the store the train stage used"
            ) from e
        tracker.resume()
    try:
        info = log_pyfunc(dit_dir, vae_dir, sampler_defaults, max_labels_per_request)
    finally:
        tracker.end()  # a failed registration is not a failed training run: the status stays FINISHED
    return mlflow.register_model(info.model_uri, name, tags=tags)


def register(
    params: RegisterParams,
    tracking: TrackingParams,
    dit_dir: str | Path,
    vae_dir: str | Path,
    eval_path: str | Path,
    eval_report: str | Path,
    images_dir: str | Path,
    latents_dir: str | Path,
    sampler_defaults: dict,
    out_report: str | Path,
) -> dict:
    """Register the evaluated model (`eval_path`: its numbers, `eval_report`: their protocol) as a version (or find
    it), set `challenger`, maybe move `champion`, and write the decision to `out_report`."""
    from pipeline.formats.model_card import read_model_card

    if not tracking.enabled:
        result = {
            "registered": False,
            "model_name": params.model_name,
            "reason": "tracking.enabled is false: "
            "the MLflow registry is off, nothing was registered; set it to true and run `dvc repro register`",
        }
        atomic_write_json(out_report, result)
        print(f"[register] {result['reason']}")
        return result
    checkpoint_sha256 = read_model_card(dit_dir)["checkpoint_sha256"]  # verifies ema.pt against model.json
    evaluation = read_evaluation(eval_path, eval_report, checkpoint_sha256)
    tags = version_tags(
        checkpoint_sha256, evaluation, evaluation_sha256(eval_path, eval_report), images_dir, latents_dir
    )
    name, metric = params.model_name, params.metric
    client = _client()
    with registry_lock(public_uri(client.tracking_uri)):  # find-or-create and decide on a registry nobody else moves
        version = _existing_version(client, name, tags)
        new_version = version is None
        if new_version:
            version = str(
                log_and_register(
                    tracking, dit_dir, vae_dir, sampler_defaults, params.max_labels_per_request, name, tags
                ).version
            )
        client.set_registered_model_alias(name, CHALLENGER, version)
        champion = _alias_version(client, name, CHAMPION)
        if champion == version:
            decision = Decision(False, f"version {version} is already champion")
        else:
            new = Candidate(version, score_of(evaluation.get(metric)), protocol_of(evaluation["protocol"], metric))
            decision = decide(new, _candidate(client, name, champion, metric) if champion else None, metric)
        client.set_model_version_tag(name, version, "promotion", decision.reason)
        if decision.promote:
            set_champion(client, name, version)
        champion = _alias_version(client, name, CHAMPION)
    result = {
        "registered": True,
        "model_name": name,
        "version": int(version),
        "new_version": new_version,
        "run_id": client.get_model_version(name, version).run_id,
        "metric": metric,
        metric: score_of(evaluation.get(metric)),
        "promoted": decision.promote,
        "champion_version": int(champion) if champion else None,
        "reason": decision.reason,
    }
    atomic_write_json(out_report, result)
    print(f"[register] {name} v{version}: {decision.reason}")
    return result


def show(client, name: str, metric: str) -> None:
    model = _registered(client, name)
    if model is None:
        raise UserError(f"no registered model named '{name}' at {public_uri(client.tracking_uri)}")
    print(
        f"{name}: {' '.join(f'{a}=v{v}' for a, v in sorted(model.aliases.items()))} "
        f"champion_history={_history(client, name)}"
    )
    for mv in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda m: int(m.version)):
        p = json.loads(mv.tags.get("protocol", "{}"))
        print(
            f"  v{mv.version}: {metric}={mv.tags.get(metric)} sampler={p.get('sampler')} steps={p.get('steps')} "
            f"cfg={p.get('cfg_scale')} n={p.get('num_samples')} run={mv.run_id} "
            f"exp={mv.tags.get('dvc_experiment', '-')} | {mv.tags.get('promotion', '')}"
        )


def main(argv: list[str] | None = None) -> None:
    from pipeline.params.load import load_section

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.register", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
        return
    with registry_lock(public_uri(client.tracking_uri)):  # promote and rollback rewrite champion_history too
        if args.command == "promote":
            promote(client, name, args.version, params.metric)
            print(f"{name}: champion -> v{args.version}")
        else:
            print(f"{name}: champion -> v{rollback(client, name)}")


if __name__ == "__main__":
    from pipeline.errors import run_main

    run_main(main)
