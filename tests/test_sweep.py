"""The sweep runner: the plan's expansion and estimate on the committed plan, and `python -m pipeline.study.sweep run`
for real in a copy of the repository with a tiny plan (a training run and two sampling runs of seconds each):
queued `dvc exp` experiments, records read through dvc.api, the sampling runs on the training run's lock without
training again, and a second invocation that finds everything done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from reduced_default import REDUCED, copy_finished_run

from pipeline.study.plan import expand, load_plan, number_tag, parts, run_name

REPO = Path(__file__).resolve().parents[1]


def test_the_committed_plan_expands_as_docs_study_plan_says():
    plan = load_plan(REPO / "sweeps/study-plan.yaml", REPO / "params.yaml")
    runs = expand(plan)
    train = [r for r in runs if r.kind == "train"]
    assert (len(runs), len(train)) == (48, 24)  # docs/study-plan.md, Budget
    assert {(r.model, r.conditioning) for r in train} == {
        ("DiT-Ti/2", "adaLN-Zero"),
        ("DiT-4x128/2", "adaLN-Zero"),
        ("DiT-8x256/2", "adaLN-Zero"),
        ("DiT-Ti/4", "adaLN-Zero"),
        ("DiT-Ti/1", "adaLN-Zero"),
        ("DiT-Ti/2", "adaLN"),
        ("DiT-Ti/2", "cross-attention"),
        ("DiT-Ti/2", "in-context"),
    }
    ref = next(r for r in runs if r.name == "Ti-p2-adaLN-Zero-s0")
    assert set(ref.studies) >= {"conditioning", "size", "patch", "gflops", "compute", "guidance"}
    # sampling runs follow their training run and change only sample.* keys
    for i, r in enumerate(runs):
        if r.kind == "sampling":
            assert runs.index(next(t for t in runs if t.name == r.base)) < i
            diff = {k for k, v in r.overrides(plan).items() if ref.overrides(plan).get(k) != v}
            assert {k.split(".")[0] for k in diff} <= {"sample", "train"} and not any(
                k.startswith("train.") and k not in ("train.seed", "train.model") for k in diff
            )
    chunks = parts(runs, plan, 2.0)
    assert all(plan["estimate"]["data_stages_s"] + sum(s for _, s in c) <= 2 * 3600 for c in chunks)
    total = sum(s for c in chunks for _, s in c) + len(chunks) * plan["estimate"]["data_stages_s"]
    assert total <= 6 * 3600


def test_names():
    assert run_name("DiT-8x256/2", "cross-attention", 2) == "8x256-p2-cross-attention-s2"
    assert (number_tag(1.5), number_tag(4.0)) == ("1p5", "4")


def dotted(tree: dict, prefix: str = "") -> dict:
    """{"a.b": value} of a nested dict's leaves."""
    out = {}
    for key, value in tree.items():
        out.update(dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


# A plan of seconds: DiT-Ti/4 (4 tokens), one seed; its training run, one guidance run and one DDPM run. The reduced
# default's sizes, so that its data stages (ingest, vae, encode, reference) are those of the session's reduced run,
# whose dvc.lock the sweep's repository commits: the experiments find them up to date.
# What is tested is the runner, so its stages run without Ray where they can (in-process training and sampling, one
# encode actor): each Ray start-up costs a stage seconds of 2 cores, and Ray's own paths have their tests.
IN_PROCESS = {"encode.num_actors": 1, "train.num_workers": 0, "sample.num_workers": 0}
TINY = {**dotted(REDUCED), **IN_PROCESS, "train.warmup_steps": 0, "tracking.enabled": False}


def tiny_plan() -> dict:
    plan = yaml.safe_load((REPO / "sweeps/study-plan.yaml").read_text())
    plan["base"].update(TINY)
    plan["seeds"] = [0]
    m = "DiT-Ti/4"
    plan["studies"] = {
        "conditioning": {"model": m, "conditionings": ["adaLN-Zero"]},
        "size": {"models": [m]},
        "patch": {"models": [m]},
        "sampling": {
            "models": [m],
            "seeds": [0],
            "sampler": "ddpm",
            "steps": [6],
            "num_fid_samples": 48,
            "cfg_scale": 1.0,
        },
        "guidance": {"model": m, "cfg_scales": [2.0], "num_fid_samples": 48},
    }
    return plan


@pytest.mark.slow
def test_sweep_runs_and_records_real_experiments(tmp_path, reduced_run):
    # The session's reduced run, committed with its dvc.lock as a team commits a finished run: the queued
    # experiments check its data stages' outputs out of the DVC cache and run from train on (train, curve, sample,
    # evaluate: the plan's params differ there).
    repo = copy_finished_run(reduced_run, tmp_path / "repo")
    plan = tiny_plan()
    (repo / "sweeps/study-plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    # the copy keeps the committed records (runs of the real plan, which the closing line must not count), but not
    # those named like the tiny plan's runs (the real study's Ti-p4-adaLN-Zero-s0 would count as done)
    for run in expand(plan):
        (repo / f"docs/results/runs/{run.name}.json").unlink(missing_ok=True)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": str(repo),
    }

    def sh(*cmd, check=True):
        return subprocess.run(cmd, cwd=repo, env=env, check=check, capture_output=True, text=True)

    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "the reduced run and the plan")
    applied_before = {name: (repo / name).read_bytes() for name in ("params.yaml", "dvc.lock")}

    out = sh(sys.executable, "-m", "pipeline.study.sweep", "run", "--hours", "1", check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    names = ["Ti-p4-adaLN-Zero-s0", "Ti-p4-adaLN-Zero-s0-cfg2", "Ti-p4-adaLN-Zero-s0-ddpm6"]
    records = {n: json.loads((repo / f"docs/results/runs/{n}.json").read_text()) for n in names}
    train, cfg, ddpm = (records[n] for n in names)
    commit = sh("git", "rev-parse", "HEAD").stdout.strip()
    assert all(r["plan"]["commit"] == commit for r in records.values())
    # the training run: its curve at every kept checkpoint, its final point unguided, its params as run
    assert train["curve"]["steps"] == [10, 20] and len(train["curve"]["fid"]) == 2
    assert train["params"]["train"]["model"] == "DiT-Ti/4" and train["params"]["sample"]["cfg_scale"] == 1.0
    assert train["eval"]["fid"] > 0 and 0 <= train["eval"]["class_consistency"] <= 1
    # the sampling runs: their own sampler settings, the same trained model, and train did not run again
    assert cfg["params"]["sample"]["cfg_scale"] == 2.0 and cfg["eval_protocol"]["cfg_scale"] == 2.0
    assert ddpm["params"]["sample"]["sampler"] == "ddpm" and ddpm["params"]["sample"]["steps"] == 6
    assert cfg["train_rerun"] is False and ddpm["train_rerun"] is False
    assert cfg["train"] == train["train"]
    assert cfg["eval"]["fid"] != train["eval"]["fid"]
    # one reference for the three (the report pools only such runs), and the machine that measured them
    assert len({r["eval_protocol"]["reference_stats_sha256"] for r in records.values()}) == 1
    assert all(r["machine"]["torch"] == torch.__version__ and r["machine"]["cpu"] for r in records.values())
    # the workspace is as it was: apply's files put back
    assert {name: (repo / name).read_bytes() for name in applied_before} == applied_before
    # resumable: a second invocation finds every run done and queues nothing
    again = sh(sys.executable, "-m", "pipeline.study.sweep", "run", "--hours", "1")
    assert "running" not in again.stdout and "3 of 3 planned runs recorded" in again.stdout


def test_a_record_of_another_reference_is_run_again(tmp_path):
    # pipeline.study.verdicts.one_reference: the report pools the runs of the reference most records share; the rest are
    # not done, so the next `sweep run` redoes them where the others ran
    from pipeline.study.sweep import done

    plan = load_plan(REPO / "sweeps/study-plan.yaml", check=False)
    names = [r.name for r in expand(plan)][:4]
    for name, ref in zip(names + ["not-in-the-plan"], "aaba" + "c"):
        rec = {"name": name, "eval": {}, "eval_protocol": {"reference_stats_sha256": ref * 64}}
        (tmp_path / f"{name}.json").write_text(json.dumps(rec))
    assert done(plan, tmp_path) == {names[0], names[1], names[3]}


def test_a_directory_that_head_tracks_is_copied_into_the_queued_run_file_by_file(tmp_path, monkeypatch):
    # A sampling run's queued copy is a checkout of HEAD: a committed run's metrics/ is already there, and DVC's
    # --copy-paths refuses to copy a directory over one.
    from pipeline.study.sweep import copied_paths

    monkeypatch.chdir(tmp_path)
    for name in ("dvc.lock", "metrics/eval.json", "metrics/train.json", "reports/eval.json"):
        Path(name).parent.mkdir(exist_ok=True)
        Path(name).write_text("{}")
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["git", "add", "metrics/eval.json"], check=True)
    assert copied_paths(["dvc.lock", "metrics", "reports", "plots"]) == [
        "dvc.lock",
        "metrics/eval.json",
        "metrics/train.json",
        "reports",
    ]


@pytest.mark.slow
def test_applying_an_experiment_keeps_the_records_written_here(tmp_path, monkeypatch):
    # `dvc exp apply` checks out the experiment's version of every git-tracked file. A record the runner rewrote
    # here (a run redone on the pooled reference) must survive the apply of a sampling batch.
    from pipeline.study.sweep import RUNS_DIR, applied

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")

    def sh(*cmd):
        subprocess.run(cmd, check=True, capture_output=True, text=True)

    git = ("git", "-c", "user.name=t", "-c", "user.email=t@t")
    sh("git", "init", "-q", "-b", "main")
    sh("dvc", "init", "-q")
    (tmp_path / "params.yaml").write_text("n: 1\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  count:\n    cmd: echo ${n} > out.txt\n    params: [n]\n    outs: [out.txt]\n"
    )
    record = tmp_path / RUNS_DIR / "Ti-p2-adaLN-Zero-s0.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"reference": "the earlier machine"}')
    sh(*git, "add", "-A")
    sh(*git, "commit", "-qm", "base")
    sh("dvc", "exp", "run", "--temp", "-q", "-n", "trained", "-S", "n=2")  # the workspace stays at n: 1
    params_before = (tmp_path / "params.yaml").read_text()

    record.write_text('{"reference": "redone here"}')  # rewritten here, not committed yet
    with applied("trained"):
        assert "n: 2" in (tmp_path / "params.yaml").read_text()  # the experiment is applied
        assert record.read_text() == '{"reference": "redone here"}'
    assert record.read_text() == '{"reference": "redone here"}'
    assert (tmp_path / "params.yaml").read_text() == params_before
