"""The register stage and the registry CLI against real MLflow stores: a sqlite file per test, a real
`mlflow server`, and `mlflow models serve` for the pyfunc model. Tiny DiT (depth 1, 8x8 latents, 3 classes) and a
tiny KL-VAE (16 px images), exported as the train and vae stages write them, sampled by the sample stage and scored
by the evaluate stage against a reference stage output of real images; CPU only, loopback only."""

import json
import os
import runpy
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from conftest import (
    EXPERIMENT,
    IMAGE,
    MAX_LABELS,
    NAME,
    NUM_SAMPLES,
    REPO,
    SAMPLER,
    export_dit,
    free_port,
    register,
    register_cli_args,
    start,
    stop,
    training_run,
    wait_http,
    write_eval,
)

from pipeline import register as R
from pipeline.artifacts import ArtifactError, sha256_file
from pipeline.errors import UserError
from pipeline.params.load import read_yaml
from pipeline.params.register import RegisterParams

MLFLOW = Path(sys.executable).parent / "mlflow"
PARAMS = RegisterParams(model_name=NAME, metric="fid", max_labels_per_request=MAX_LABELS)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory) -> Path:
    """An initialised, empty sqlite store: creating the tables takes ~6 s, copying the file ~0."""
    path = tmp_path_factory.mktemp("store") / "empty.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def new_store(empty_db: Path, path: Path) -> str:
    shutil.copyfile(empty_db, path)
    return f"sqlite:///{path}"


@pytest.fixture(autouse=True)
def store(empty_db, tmp_path, monkeypatch):
    """A fresh sqlite tracking store per test (never the repository's mlflow.db), its experiment's artifacts in
    tmp_path, and the working directory in tmp_path so nothing can land in the checkout."""
    uri = new_store(empty_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def dit(tiny, tmp_path) -> Path:
    return export_dit(tiny, tmp_path / "dit", training_run())


def aliases(name: str = NAME) -> dict[str, str]:
    return {k: str(v) for k, v in mlflow.MlflowClient().get_registered_model(name).aliases.items()}


# --- promotion rules, end to end through the registry -----------------------------------------------------------


def test_promotion_rules(tiny, dit, evaluation, tmp_path, monkeypatch):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)  # the working directory (tmp_path) as a git checkout
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "x"], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setenv("DVC_EXP_NAME", "exp-test")

    def step(name, **changes):
        return register(
            tiny, dit, write_eval(tmp_path / f"eval-{name}.json", dit, evaluation, **changes), f"{name}.json"
        )

    missing = step("missing", fid=None)
    assert missing["registered"] and not missing["promoted"] and missing["champion_version"] is None
    assert "no finite fid" in missing["reason"] and R.CHAMPION not in aliases()
    first = step("first", fid=10.0)
    assert first["promoted"] and "no champion yet" in first["reason"] and first["champion_version"] == 2
    worse = step("worse", fid=12.0)
    assert not worse["promoted"] and "does not beat" in worse["reason"]
    equal = step("equal", fid=10.0, kid=0.02)  # kid differs: another evaluation (an identical file is deduplicated)
    assert not equal["promoted"] and "does not beat" in equal["reason"]
    steps = step("steps", fid=1.0, steps=250)
    assert not steps["promoted"] and "protocol differs" in steps["reason"] and "steps: 3 -> 250" in steps["reason"]
    reference = step("reference", fid=1.0, reference_stats_sha256="cd" * 32)
    assert not reference["promoted"] and "reference_stats_sha256" in reference["reason"]
    assert aliases() == {R.CHAMPION: "2", R.CHALLENGER: "6"}
    seed = step("seed", fid=9.0, sample_seed=1)  # another draw under the same protocol is comparable
    assert seed["promoted"] and seed["champion_version"] == 7 and "beats champion v2" in seed["reason"]
    assert aliases() == {R.CHAMPION: "7", R.CHALLENGER: "7"}
    assert json.loads(Path("seed.json").read_text()) == seed

    client = mlflow.MlflowClient()
    mv = client.get_model_version(NAME, "6")
    assert mv.run_id == json.loads((dit / "tracking.json").read_text())["mlflow_run_id"]  # linked to training
    assert mv.tags["fid"] == "1.0" and mv.tags["kid"] == str(evaluation["numbers"]["kid"])
    assert "protocol differs" in mv.tags["promotion"]
    assert json.loads(mv.tags["protocol"])["reference_stats_sha256"] == "cd" * 32
    assert mv.tags["git_commit"] == commit and mv.tags["dvc_experiment"] == "exp-test"
    assert mv.tags["checkpoint_sha256"] == json.loads((dit / "model.json").read_text())["ema_sha256"]
    assert mv.tags["latents_sha256"] == sha256_file(tiny["latents"] / "manifest.json")
    assert mv.tags["dataset_sha256"] == sha256_file(tiny["images"] / "manifest.json")
    assert mv.tags["eval_sha256"] == R.evaluation_sha256(
        tmp_path / "eval-reference.json", tmp_path / "eval-reference.report.json"
    )
    assert "fid" not in client.get_model_version(NAME, "1").tags
    assert json.loads(client.get_registered_model(NAME).tags[R.HISTORY_TAG]) == ["2", "7"]


def test_kid_protocol_includes_its_subsets(evaluation):
    protocol = evaluation["report"]["protocol"]
    base = R.protocol_of(protocol, "kid")
    assert base["kid_subset_size"] == 12 and "kid_subsets" not in R.protocol_of(protocol, "fid")
    assert set(R.PROTOCOL_KEYS) <= set(protocol)  # every compared fact is one the evaluate stage writes
    assert protocol["num_samples"] == NUM_SAMPLES and protocol["steps"] == 3 and protocol["extractor"] == "classifier"


def test_evaluation_of_another_checkpoint_is_refused(tiny, dit, evaluation, tmp_path):
    eval_path = write_eval(tmp_path / "eval.json", dit, evaluation, checkpoint_sha256="00" * 32)
    with pytest.raises(ArtifactError, match="dvc repro sample evaluate"):
        register(tiny, dit, eval_path)


def test_training_run_missing_from_the_store_is_a_clear_error(tiny, evaluation, empty_db, tmp_path, monkeypatch):
    dit_dir = export_dit(tiny, tmp_path / "dit", training_run())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", new_store(empty_db, tmp_path / "other.db"))
    with pytest.raises(ArtifactError, match="not in the tracking store"):
        register(tiny, dit_dir, write_eval(tmp_path / "eval.json", dit_dir, evaluation))


# --- idempotence, the stage script and tracking off -------------------------------------------------------------


def write_params(path: Path, enabled: bool, name: str = NAME) -> Path:
    sample = {**read_yaml(REPO / "params.yaml")["sample"], **SAMPLER}  # the repository's section, our sampler
    path.write_text(
        yaml.safe_dump(
            {
                "register": {"model_name": name, "metric": "fid", "max_labels_per_request": MAX_LABELS},
                "sample": sample,
                "tracking": {"enabled": enabled, "experiment": EXPERIMENT},
            }
        )
    )
    return path


def run_stage(tiny, params: Path, dit_dir: Path, evaluated: tuple[Path, Path], out: Path, monkeypatch) -> dict:
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "stages/register.py",
            *register_cli_args(params, dit_dir, tiny, evaluated, out),
        ],
    )
    runpy.run_path(str(REPO / "stages" / "register.py"), run_name="__main__")
    return json.loads(out.read_text())


def test_unchanged_inputs_register_no_duplicate(tiny, dit, evaluation, tmp_path, monkeypatch):
    eval_path = write_eval(tmp_path / "eval.json", dit, evaluation)
    params = write_params(tmp_path / "params.yaml", enabled=True)
    first = run_stage(tiny, params, dit, eval_path, tmp_path / "reports" / "register.json", monkeypatch)
    assert first["version"] == 1 and first["new_version"] and first["promoted"]
    again = register(tiny, dit, eval_path)
    assert again["version"] == 1 and not again["new_version"] and not again["promoted"]
    assert "already champion" in again["reason"]
    assert [mv.version for mv in mlflow.MlflowClient().search_model_versions(f"name = '{NAME}'")] == [1]
    assert (
        len(
            mlflow.search_logged_models(
                experiment_ids=[mlflow.get_experiment_by_name(EXPERIMENT).experiment_id], output_format="list"
            )
        )
        == 1
    )
    other = register(tiny, dit, write_eval(tmp_path / "eval2.json", dit, evaluation, fid=9.0))  # a new evaluation
    assert other["version"] == 2 and other["new_version"]


def test_tracking_off_registers_nothing_and_says_why(tiny, evaluation, tmp_path, monkeypatch):
    dit_dir = export_dit(tiny, tmp_path / "dit", run_id=None)
    params = write_params(tmp_path / "params.yaml", enabled=False)
    result = run_stage(
        tiny,
        params,
        dit_dir,
        write_eval(tmp_path / "eval.json", dit_dir, evaluation),
        tmp_path / "register.json",
        monkeypatch,
    )
    assert result["registered"] is False and "tracking.enabled is false" in result["reason"]
    assert mlflow.MlflowClient().search_experiments(filter_string=f"name = '{EXPERIMENT}'") == []


def test_no_training_run_logs_into_a_register_run(tiny, evaluation, tmp_path):
    dit_dir = export_dit(tiny, tmp_path / "dit", run_id=None)  # train ran with tracking off
    training_run()  # creates the experiment in tmp_path
    result = register(tiny, dit_dir, write_eval(tmp_path / "eval.json", dit_dir, evaluation))
    assert result["promoted"] and mlflow.get_run(result["run_id"]).info.run_name == "register"


# --- the pyfunc model -------------------------------------------------------------------------------------------


def test_pyfunc_round_trip(tiny, dit, evaluation, tmp_path):
    register(tiny, dit, write_eval(tmp_path / "eval.json", dit, evaluation))
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@{R.CHAMPION}")
    labels = np.array([0, 2])
    a = model.predict(labels, params={"seed": 1})
    assert a.shape == (2, IMAGE, IMAGE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, model.predict(labels, params={"seed": 1}))
    assert not np.array_equal(a, model.predict(labels, params={"seed": 2}))
    assert not np.array_equal(a, model.predict(labels, params={"seed": 1, "sampler": "ddim", "steps": 2}))
    assert np.array_equal(model.predict(labels), model.predict(labels, params={"seed": 0}))  # defaults = SAMPLER
    defaults = {p.name: p.default for p in model.metadata.get_params_schema().params}
    assert defaults == {k: SAMPLER[k] for k in ("seed", "cfg_scale", "steps", "sampler")}
    with pytest.raises(Exception, match=r"class labels in \[0, 3\)"):
        model.predict(np.array([0, 3]))

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@{R.CHAMPION}", dst_path=str(tmp_path / "m")))
    files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))], files  # models from code: nothing pickled
    assert {"artifacts/dit/ema.pt", "artifacts/vae/config.json", "code/pipeline/sample.py"} <= set(files)
    requirements = (local / "requirements.txt").read_text()
    assert "torch>=2.4" in requirements and "diffusers==" in requirements and "mlflow==" in requirements


# --- the CLI: show, promote, rollback ---------------------------------------------------------------------------


def cli(tmp_path, *args):
    R.main(["--params", str(write_params(tmp_path / "params.yaml", enabled=True)), *args])


def test_promote_and_rollback(tiny, dit, evaluation, tmp_path, capsys):
    with pytest.raises(UserError, match="no registered model"):
        cli(tmp_path, "rollback")
    register(tiny, dit, write_eval(tmp_path / "e1.json", dit, evaluation, fid=10.0))
    with pytest.raises(UserError, match="no previous champion"):
        cli(tmp_path, "rollback")
    assert register(tiny, dit, write_eval(tmp_path / "e2.json", dit, evaluation, fid=8.0))["promoted"]
    assert register(tiny, dit, write_eval(tmp_path / "e3.json", dit, evaluation, fid=9.0, steps=50))["version"] == 3
    cli(tmp_path, "rollback")
    assert aliases()[R.CHAMPION] == "1"
    cli(tmp_path, "promote", "3")  # manual promotion ignores protocol and score
    assert aliases()[R.CHAMPION] == "3"
    cli(tmp_path, "rollback")
    assert aliases()[R.CHAMPION] == "1"
    with pytest.raises(UserError, match="no version '9'"):
        cli(tmp_path, "promote", "9")
    capsys.readouterr()
    cli(tmp_path, "show")
    out = capsys.readouterr().out
    assert f"{NAME}: challenger=v3 champion=v1 champion_history=['1']" in out and "v2: fid=8.0" in out
    mlflow.MlflowClient().set_registered_model_alias(NAME, R.CHAMPION, "2")  # moved by hand, e.g. in the UI
    with pytest.raises(UserError, match="moved outside this tool"):
        cli(tmp_path, "rollback")


# --- real servers -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_register_and_promote_through_a_tracking_server(tiny, evaluation, tracking_server, tmp_path, monkeypatch):
    # The session's tracking server (conftest), where this test's model has a name of its own.
    (uri, store), name = tracking_server, f"{NAME}-server"
    stored_before = set(store.rglob("ema.pt"))
    params = RegisterParams(model_name=name, metric="fid", max_labels_per_request=MAX_LABELS)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    dit_dir = export_dit(tiny, tmp_path / "dit", training_run())
    first = register(tiny, dit_dir, write_eval(tmp_path / "e1.json", dit_dir, evaluation, fid=10.0), params=params)
    e2 = write_eval(tmp_path / "e2.json", dit_dir, evaluation, fid=9.0)
    better = register(tiny, dit_dir, e2, params=params)
    assert first["promoted"] and better["promoted"] and aliases(name)[R.CHAMPION] == "2"
    assert register(tiny, dit_dir, e2, params=params)["version"] == 2  # dedup through the REST search
    R.main(["--params", str(write_params(tmp_path / "params.yaml", enabled=True, name=name)), "rollback"])
    assert aliases(name)[R.CHAMPION] == "1"
    assert set(store.rglob("ema.pt")) - stored_before, "artifacts must go to the server's store"
    model = mlflow.pyfunc.load_model(f"models:/{name}@{R.CHAMPION}")
    assert model.predict(np.array([1]), params={"seed": 3}).shape == (1, IMAGE, IMAGE, 3)


@pytest.mark.slow
def test_models_serve_answers_invocations(tiny, dit, evaluation, tmp_path, store):
    register(tiny, dit, write_eval(tmp_path / "eval.json", dit, evaluation))
    port = free_port()
    # `mlflow models serve` execs a bare `uvicorn`: the venv's bin must be on PATH (an activated venv)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": store,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{MLFLOW.parent}{os.pathsep}{os.environ['PATH']}",
    }
    server = start(
        [
            str(MLFLOW),
            "models",
            "serve",
            "-m",
            f"models:/{NAME}@{R.CHAMPION}",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", server, timeout_s=120)
        body = json.dumps({"inputs": [0, 1], "params": {"seed": 1}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                images = np.array(json.loads(response.read())["predictions"])
        except urllib.error.HTTPError as e:
            pytest.fail(f"/invocations answered {e.code}: {e.read().decode()[-2000:]}")
    finally:
        stop(server)
    assert images.shape == (2, IMAGE, IMAGE, 3) and images.min() >= 0 and images.max() <= 255
    local = mlflow.pyfunc.load_model(f"models:/{NAME}@{R.CHAMPION}").predict(np.array([0, 1]), params={"seed": 1})
    assert np.array_equal(images.astype(np.uint8), local)  # the server is the same model, seed for seed
