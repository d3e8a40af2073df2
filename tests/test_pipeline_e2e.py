"""End to end: `dvc repro` of a reduced offline default in a fresh copy of the repository, then again (no-op);
then versioning: `dvc push` to a local remote and `dvc pull` in a git clone restore every output without
recomputing, and `git checkout` + `dvc checkout` of an earlier commit bring back its metrics and samples."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from reduced_default import (
    RUN_RECORDS,
    STAGES,
    TIMED,
    assert_same_outputs,
    copy_finished_run,
    git_repo,
    lock_hashes,
    merge,
    run,
)

from pipeline import fingerprint as F

REPO = Path(__file__).resolve().parents[1]


# The stages that start no Ray: the cluster test takes ingest and vae from DVC's run cache and reruns the others.
WITHOUT_RAY = ("fingerprint", "ingest", "vae")


def _check_reruns_are_byte_identical(repo: Path, env: dict, before: Path) -> None:
    """The stages that start no Ray again (forced), then each output's hash in dvc.lock against the first run's,
    and what differs inside the others. The other stages run again from nothing (empty checkpoint and shard
    directories) on the two-node cluster of tests/test_cluster.py, whose test checks their bytes against this same
    run: one rerun serves both claims. It takes ingest and vae from DVC's run cache, so they rerun here."""
    hashes = lock_hashes(repo)
    for rel in (*TIMED, *RUN_RECORDS, "models/checkpoints"):
        (before / rel).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (repo / rel).is_dir() else shutil.copy2
        copy(repo / rel, before / rel)
    out = run(["dvc", "repro", "--force", "--single-item", *WITHOUT_RAY], repo, env)
    assert sorted(re.findall(r"Running stage '([\w-]+)'", out)) == sorted(WITHOUT_RAY), out[-3000:]
    changed = assert_same_outputs(repo, before, hashes)
    print(f"byte-stable: {sorted(set(hashes) - changed)}; differing only in time or run ids: {sorted(changed)}")


def _check_fingerprints_cover_what_ran(repo: Path, imports: Path) -> None:
    """The oracle of the static closures: each `pipeline` module a stage's processes (its script and its Ray
    workers) really imported is listed in that stage's fingerprint file."""
    loaded: dict[str, set[str]] = {}
    for line in imports.read_text().splitlines():
        stage, _, name = line.split("\t")
        path = F.module_file(name, repo)
        if path is not None and (path.name != "__init__.py" or F.has_code(path)):
            loaded.setdefault(stage, set()).add(path.relative_to(repo).as_posix())
    # Ray workers too name their stage; the launcher of the run's one local Ray (`python -m pipeline.cluster run`)
    # is no stage.
    assert set(loaded) == {"fingerprint", *STAGES, "other:pipeline.cluster"}, sorted(loaded)
    for stage in STAGES:
        listed = json.loads((repo / "fingerprints" / f"{stage}.json").read_text())["modules"]
        assert loaded[stage] <= set(listed), (stage, sorted(loaded[stage] - set(listed)))
    assert loaded["train"] >= {"pipeline/train.py", "pipeline/train_log.py", "pipeline/generate.py"}  # rank 0's grids


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_dvc_repro_end_to_end_then_nothing_reruns(reduced_run, tmp_path):
    # The first `dvc repro` is the session's (conftest `reduced_run`), run in a fresh copy of the repository with
    # every warning printed and every import logged (reduced_default.first_run); what follows changes the
    # repository, so it runs in a copy of that finished run.
    first = reduced_run.output
    for stage in ("fingerprint", *STAGES):
        assert f"Running stage '{stage}'" in first, first[-3000:]
    # No warning from this project's own calls: a deprecated API, an unsafe conversion (third-party code warning
    # about itself names its own file).
    ours = re.findall(
        rf"^.*{re.escape(str(reduced_run.repo))}/(?:pipeline|stages)/\S+\.py:\d+: \w*Warning\b.*$", first, re.M
    )
    assert not ours, "\n".join(ours)
    _check_fingerprints_cover_what_ran(reduced_run.repo, reduced_run.imports)
    # Ray's known noise stays quiet (pipeline.cluster, pipeline.encode): before, 139 and 2 lines in this run.
    assert "Failed to query Ray Train Controller" not in first and "the actor restart will fail" not in first

    repo, env = copy_finished_run(reduced_run, tmp_path / "repo"), reduced_run.env
    params = yaml.safe_load((repo / "params.yaml").read_text())
    images = json.loads((repo / "data/images/manifest.json").read_text())
    assert images["count"] == 240 and images["num_classes"] == 10
    assert json.loads((repo / "models/vae/config.json").read_text())["scaling_factor"] > 0
    latents = json.loads((repo / "data/latents/manifest.json").read_text())
    assert latents["count"] == 240 and latents["flip"] is True
    model = json.loads((repo / "models/dit/model.json").read_text())
    assert model["train_steps"] == 20 and (repo / "models/dit/ema.pt").exists()
    assert (repo / "data/reference/stats.npz").exists()
    with np.load(repo / "data/samples/samples.npz") as samples:
        assert samples["arr_0"].shape == (48, 32, 32, 3) and samples["arr_0"].dtype == np.uint8
    assert (repo / "data/samples/grid.png").stat().st_size > 0
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    assert np.isfinite(evaluation["fid"]) and "protocol" not in evaluation
    assert json.loads((repo / "reports/eval.json").read_text())["protocol"]["num_samples"] == 48
    assert len((repo / "plots/train.csv").read_text().splitlines()) > 2
    registered = json.loads((repo / "reports/register.json").read_text())
    assert registered["promoted"] is True

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    champion = client.get_model_version_by_alias(registered["model_name"], "champion")
    assert int(champion.version) == registered["version"]
    assert champion.tags["checkpoint_sha256"] == model["ema_sha256"]

    curve = json.loads((repo / "reports/curve.json").read_text())
    assert curve["steps"] == [10, 20] and all(np.isfinite(curve["fid"])) and curve["gflops"] > 0
    assert json.loads((repo / "metrics/curve.json").read_text())["fid"] == curve["fid"][-1]

    # DVC's own view stays readable: metrics files hold numbers only (72 columns before the records moved out).
    header = run(["dvc", "metrics", "show", "--md"], repo, env).splitlines()[0]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[0] == "Path" and len(columns) < 20, columns

    second = run(["dvc", "repro"], repo, env)
    assert "Running stage" not in second, second[-3000:]
    assert "up to date" in run(["dvc", "status"], repo, env)
    _check_reruns_are_byte_identical(repo, env, tmp_path / "before")
    # The same bytes: nothing downstream of the reruns is stale.
    assert "Running stage" not in run(["dvc", "repro"], repo, env)
    assert "up to date" in run(["dvc", "status"], repo, env)

    # Versioning. Commit this run, then a second one that only resamples (another seed).
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "run 1"], repo, env)
    run(["dvc", "remote", "add", "-d", "store", str(tmp_path / "remote")], repo, env)
    run(["dvc", "push"], repo, env)
    first_eval = (repo / "metrics/eval.json").read_text()
    first_samples = (repo / "data/samples/samples.npz").read_bytes()
    params["sample"]["seed"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = run(["dvc", "repro"], repo, env)
    assert "Running stage 'sample'" in rerun and "Running stage 'train'" not in rerun, rerun[-3000:]
    assert (repo / "data/samples/samples.npz").read_bytes() != first_samples
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "run 2: sample seed 1"], repo, env)
    run(["dvc", "push"], repo, env)

    # A fresh clone of run 2 pulls its data and models from the remote: nothing is left to recompute.
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    run(["dvc", "pull"], clone, env)
    assert "up to date" in run(["dvc", "status"], clone, env)
    assert (clone / "models/dit/ema.pt").read_bytes() == (repo / "models/dit/ema.pt").read_bytes()
    assert (clone / "data/samples/samples.npz").read_bytes() == (repo / "data/samples/samples.npz").read_bytes()

    # Back to run 1: git brings its metrics and lock file, dvc checkout its samples.
    run(["git", "checkout", "-q", "HEAD~1"], repo, env)
    run(["dvc", "checkout"], repo, env)
    assert (repo / "metrics/eval.json").read_text() == first_eval
    assert (repo / "data/samples/samples.npz").read_bytes() == first_samples
    assert "up to date" in run(["dvc", "status"], repo, env)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_changed_input_image_reruns_ingest_and_downstream(tmp_path):
    """An imagefolder source tracked with `dvc add` is a dep of ingest: one changed image reruns ingest and vae."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("dark", "light")):
        for i in range(12):
            folder = tmp_path / "faces" / name
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 100, (12, 12, 3)) + 150 * c
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:02d}.png")
    params = merge(
        yaml.safe_load((REPO / "params.yaml").read_text()),
        {
            "ingest": {"source": "imagefolder", "image_size": 8, "imagefolder": {"root": "inputs/faces"}},
            "vae": {"train_steps": 2, "holdout": 4, "batch_size": 4, "block_out_channels": [8, 8, 8]},
        },
    )
    repo = tmp_path / "repo"
    env = git_repo(repo, params)
    shutil.copytree(tmp_path / "faces", repo / "inputs/faces")
    run(["dvc", "add", "inputs/faces"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "inputs/faces"], repo, env)

    first = run(["dvc", "repro", "vae"], repo, env)
    assert "Running stage 'ingest'" in first and "Running stage 'vae'" in first, first[-3000:]
    assert json.loads((repo / "data/images/manifest.json").read_text())["count"] == 24
    assert "up to date" in run(["dvc", "status", "--with-deps", "vae"], repo, env)

    image = repo / "inputs/faces/dark/03.png"
    image.unlink()  # dvc add may link the file to its cache: replace it, never write through the link
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(image)
    status = run(["dvc", "status", "--with-deps", "vae"], repo, env)
    assert "ingest:" in status and "modified:" in status and "inputs/faces" in status, status
    again = run(["dvc", "repro", "vae"], repo, env)
    assert "Running stage 'ingest'" in again and "Running stage 'vae'" in again, again[-3000:]
    run(["dvc", "add", "inputs/faces"], repo, env)  # the new version of the input, for `git commit`
    assert "up to date" in run(["dvc", "status", "--with-deps", "vae"], repo, env)
