"""A real two-node Ray cluster on this machine, locked with a token, started with the commands of docs/cluster.md's
"From a laptop to a cluster": `ray start --head` plus `ray start --address=...`, each node with its own CPU and
temp dir. Clients without the token are refused; one with it joins through `pipeline.cluster.init_ray`. `dvc repro`
on the cluster spreads the `encode` stage's actors, `train`'s DDP workers and `sample`'s actors one per node, with
the bytes of a local one-node Ray; a training whose worker node is lost ends with the bytes of one uninterrupted."""

import contextlib
import copy
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import BUCKET, CREDENTIALS, free_port, keys, mlflow_server

from pipeline.shared_storage import CACHE_ENV as NODE_CACHE_ENV

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
REPO = Path(__file__).resolve().parents[1]
# Ray rewrites 127.0.0.1 and localhost in an address to this machine's network address, so that a node elsewhere
# could use it; any other loopback address is kept, and the head's GCS listens on it too. Traffic stays on `lo`.
JOIN_HOST = "127.0.0.2"
# The head's CPUs and the worker node's: `encode` with 2 actors needs a third CPU, for reading.
HEAD_CPUS, WORKER_CPUS = 2, 1


def hidden_paths() -> list[Path]:
    """What a node without the project must not read: this checkout, the venv and the checkout holding the venv
    (where its editable install points)."""
    paths = {REPO}
    if sys.prefix != sys.base_prefix:  # a venv: hide it and the checkout it lives in
        paths |= {Path(sys.prefix), Path(sys.prefix).parent}
    return sorted(p for p in paths if not any(q in p.parents for q in paths))  # covering a parent hides the rest


def without_the_project(cmd: list[str], node_env: str, data: tuple[Path, ...] = ()) -> list[str]:
    """`cmd` in a mount namespace of its own, as a node that has Python and the dependencies but not the project:
    the venv is bound at `node_env` (the same packages, installed elsewhere), then the checkout, the venv's own
    path and the driver's `data` directories are covered by empty tmpfs mounts. The node's workers get `pipeline`
    only through Ray's runtime_env, and the driver's artifacts only through storage (pipeline/shared_storage.py)."""
    python = f"{node_env}/bin/python"
    script = [f"mount --bind {sys.prefix} {node_env}"]
    script += [f"mount -t tmpfs -o size=1m tmpfs {path}" for path in [*hidden_paths(), *data]]
    script.append(" ".join(["exec", python, "-m", "ray.scripts.scripts", *cmd[1:]]))
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-ec", " && ".join(script)]


def start_node(
    env: dict, head_port: int, head: bool, num_cpus: int, hidden_data: tuple[Path, ...] = ()
) -> tuple[subprocess.Popen, str]:
    """`ray start --block` in its own process group: SIGTERM to it stops this node's processes and no other Ray's
    (`ray stop` would stop every Ray on the machine). Short temp dirs: Ray's socket paths must stay under 108 bytes.
    The worker node runs without the project and without `hidden_data` (`without_the_project`). Each node keeps
    the artifacts it copies from storage in a cache of its own (`<temp dir>/node-cache`), as separate machines do."""
    temp_dir = tempfile.mkdtemp(prefix="ray-")
    env = {**env, NODE_CACHE_ENV: f"{temp_dir}/node-cache"}
    cmd = [
        RAY,
        "start",
        "--block",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        "--node-ip-address=127.0.0.1",
        "--disable-usage-stats",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]
    if head:
        cmd += ["--head", f"--port={head_port}", "--include-dashboard=false"]
    else:
        cmd += [f"--address={JOIN_HOST}:{head_port}"]
        Path(temp_dir, "env").mkdir()
        cmd = without_the_project(cmd, f"{temp_dir}/env", hidden_data)
    log = open(f"{temp_dir}.log", "w")
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT), temp_dir


def stop_node(proc: subprocess.Popen, temp_dir: str) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of this node's group only
        except ProcessLookupError:
            pass
        shutil.rmtree(temp_dir, ignore_errors=True)
        Path(f"{temp_dir}.log").unlink(missing_ok=True)


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ray start --head exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the head's GCS did not listen on port {port} within {seconds} s")


WAIT_FOR_NODES = """
import sys, time
import ray
ray.init()
deadline = time.monotonic() + float(sys.argv[2])
while sum(n["Alive"] for n in ray.nodes()) < int(sys.argv[1]):
    assert time.monotonic() < deadline, f"{sum(n['Alive'] for n in ray.nodes())} nodes alive"
    time.sleep(0.5)
"""


def wait_for_nodes(env: dict, address: str, count: int, seconds: float = 120) -> None:
    """Until `count` nodes are alive: a stage started before the worker node registers sees the head's CPUs only."""
    done = subprocess.run(
        [sys.executable, "-c", WAIT_FOR_NODES, str(count), str(seconds)],
        cwd=REPO,
        env={**env, "RAY_ADDRESS": address},
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    assert done.returncode == 0, done.stderr[-2000:]


@contextlib.contextmanager
def two_nodes(token_dir: Path, s3_endpoint: str, hidden_data: tuple[Path, ...] = ()):
    """Yields (address, env of a client holding the token, [(head process, temp dir), (worker ...)]). The worker
    node cannot read `hidden_data` (nor the token dir, if it lies there: keep it apart)."""
    token_file = token_dir / "auth_token"
    with open(os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_")) and k != "PYTHONPATH"}
    env.update(CREDENTIALS, AWS_ENDPOINT_URL=s3_endpoint, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    # SIGTERM to `ray start --block` first drains the node for up to 30 s (for Ray Serve's replicas: none here),
    # which every stop of these nodes would wait out; 0 stops a node at once.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    # The GCS declares a node dead after this many failed health checks, one a period: 3 x 1 s rather than Ray's
    # 5 x 3 s, so that a lost node is replaced seconds sooner. A busy node still has each check's 10 s to answer.
    env.update(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
    port = free_port()
    nodes = [start_node(env, port, head=True, num_cpus=HEAD_CPUS)]
    try:
        wait_for_port(port, nodes[0][0])
        nodes.append(start_node(env, port, head=False, num_cpus=WORKER_CPUS, hidden_data=hidden_data))
        wait_for_nodes(env, f"{JOIN_HOST}:{port}", 2)
        yield f"{JOIN_HOST}:{port}", env, nodes
    finally:
        for proc, temp_dir in reversed(nodes):
            stop_node(proc, temp_dir)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    """Yields (address, env of a client holding the token). The nodes read the token from a 0600 file named by
    RAY_AUTH_TOKEN_PATH; the session's own RAY_AUTH_TOKEN (conftest) is kept away from them. The head has 2 CPUs and
    the worker 1: `encode` with 2 actors needs a third CPU for reading. The worker node cannot read the project
    (`without_the_project`), and neither node has it on PYTHONPATH: their workers import the driver's `pipeline`
    from Ray's runtime_env (`cluster.init_ray`). Both start with the S3 server's credentials in their environment,
    as a cluster's nodes hold theirs (the stages' storage_path). The worker node cannot read any of the tests'
    files (pytest's base temp dir is covered there): the latents, images, VAE and weights reach it through S3."""
    token_dir = Path(tempfile.mkdtemp(prefix="ray-token-"))  # outside the hidden data: both nodes read it
    try:
        with two_nodes(token_dir, s3[0], hidden_data=(tmp_path_factory.getbasetemp(),)) as (address, env, nodes):
            yield address, env, nodes
    finally:
        shutil.rmtree(token_dir, ignore_errors=True)


def node_cache(nodes, i: int) -> dict[str, list[str]]:
    """{kind: [content hashes]} that node `i` (0 = head, 1 = worker) copied from storage."""
    root = Path(nodes[i][1]) / "node-cache"
    return (
        {
            kind.name: sorted(d.name for d in kind.iterdir() if not d.name.startswith("."))
            for kind in sorted(root.iterdir())
        }
        if root.is_dir()
        else {}
    )


# Runs in a fresh process (Ray reads its auth settings once per process): joins through the project's init_ray,
# waits for both nodes, then spreads two actors and reports the node each one runs on.
CLIENT = """
import json, os, time
import ray
import pipeline
from pipeline.cluster import init_ray


def code():
    # sha256 of every source file of the `pipeline` package this process imports
    import hashlib, pathlib
    root = pathlib.Path(pipeline.__file__).parent
    files = sorted(root.rglob("*.py"))
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


init_ray()
deadline = time.monotonic() + 120
while len(alive := [n["NodeID"] for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
    time.sleep(0.5)

@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
class Where:
    def node(self, checkout):
        import pipeline
        return {"node": ray.get_runtime_context().get_node_id(), "pipeline": pipeline.__file__,
                "sees_checkout": os.path.exists(os.path.join(checkout, "pipeline", "__init__.py")),
                "code": code()}

checkout = os.path.dirname(os.path.dirname(pipeline.__file__))
actors = [Where.remote() for _ in range(2)]
report = {"alive": alive, "actors": ray.get([a.node.remote(checkout) for a in actors], timeout=120),
          "checkout": checkout, "code": code()}
open(os.environ["REPORT_PATH"], "w").write(json.dumps(report))
"""


# The scripts write their report to REPORT_PATH, not stdout: Ray forwards raylet warnings to the driver's stdout
# whenever they come, even after the script's last print (CI once parsed such a warning as the report).
def client(env: dict, address: str, script: str = CLIENT, report: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**env, "RAY_ADDRESS": address, "REPORT_PATH": str(report or os.devnull)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_only_a_client_with_the_token_gets_in_and_work_lands_on_both_nodes(cluster, tmp_path):
    address, env, _ = cluster
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    # Plain Ray clients, as an outsider would run them: one with a token of its own, one that sends none (auth mode
    # unset and no ~/.ray/auth_token: an address given explicitly does not turn token auth on in the client).
    refused = {
        "wrong token": client(
            {**no_token, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)},
            address,
            "import ray; ray.init()",
        ),
        "no token": client({**no_token, "HOME": str(tmp_path)}, address, "import ray; ray.init()"),
    }
    admitted = client(env, address, report=tmp_path / "report.json")
    for name, proc in refused.items():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode != 0, f"{name}: joined a token-locked cluster: {out}"
        assert "Authentication token is missing or incorrect" in err, f"{name}: {err[-2000:]}"
    out, err = admitted.communicate(timeout=240)
    assert admitted.returncode == 0, err[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(set(report["alive"])) == 2
    actors = report["actors"]
    assert sorted(a["node"] for a in actors) == sorted(report["alive"])  # one actor on each node
    assert report["checkout"] == str(REPO)
    # The worker node cannot read the project; every worker runs the driver's code, shipped by Ray's runtime_env.
    assert sorted(a["sees_checkout"] for a in actors) == [False, True]
    remote = next(a for a in actors if not a["sees_checkout"])
    assert not remote["pipeline"].startswith(str(REPO)), remote["pipeline"]  # runtime_env's unpacked copy
    assert all(a["code"] == report["code"] for a in actors)


# The actors the cluster's GCS has known (alive or dead: it keeps the records of ended jobs), with their class and node.
ACTORS = """
import json, os
import ray
from ray._private.state import actors
ray.init()
table = {i: [a["ActorClassName"], a["Address"]["NodeID"]] for i, a in actors().items()}
report = {"actors": table, "alive": [n["NodeID"] for n in ray.nodes() if n["Alive"]]}
open(os.environ["REPORT_PATH"], "w").write(json.dumps(report))
"""


def test_dvc_repro_on_the_cluster_writes_the_bytes_of_one_node(cluster, s3, reduced_run, tmp_path):
    """`dvc repro` of the reduced default with RAY_ADDRESS on the two-node cluster: encode, train and sample put one
    actor or worker on each node (the GCS's actor table), the worker node gets the latents, VAE and weights through
    S3 (the stages' storage_path: what it copied is in its node cache, by content hash) and the checkpoints go
    through S3 too, the run logs to an MLflow server, and every output is byte for byte that of the same params on a
    local one-node Ray of as many CPUs: the session's reduced run (conftest `reduced_run`, run as `make repro` runs,
    with two of each Ray worker: tests/reduced_default.py); only measured time and MLflow run ids may differ, as
    between two local runs. Every stage but ingest and vae runs here from nothing, so this is also the end-to-end
    test's check that a rerun from empty checkpoint and shard directories gives the same bytes.

    Ingest and vae, which use no Ray, come from DVC's run cache, as from a team's shared cache: the reduced run's.
    (DVC keeps no run cache for a stage with persistent outputs: encode, reference, train and sample always run.)"""
    import torch
    from reduced_default import (
        RAY_CPUS,
        RAY_WORKERS,
        assert_same_outputs,
        differing_fields,
        git_repo,
        lock_hashes,
        merge,
        run,
        seed_run_cache,
    )

    from pipeline.artifacts import sha256_dir

    address, cluster_env, nodes = cluster
    assert HEAD_CPUS + WORKER_CPUS == RAY_CPUS  # the one-node run's CPUs, split over two nodes
    one_node = reduced_run.repo
    storage = {stage: {"storage_path": f"s3://{BUCKET}/repro"} for stage in RAY_WORKERS}
    on_cluster = tmp_path / "cluster"
    params = merge(copy.deepcopy(reduced_run.params), storage)
    env = {k: v for k, v in git_repo(on_cluster, params).items() if not k.startswith("RAY_")}
    env.update({k: v for k, v in cluster_env.items() if k.startswith(("AWS_", "RAY_AUTH"))}, RAY_ADDRESS=address)
    seed_run_cache(on_cluster, one_node)
    server = mlflow_server(
        f"sqlite:///{tmp_path / 'mlflow-server.db'}",
        f"s3://{BUCKET}/mlflow",
        env={**env, "MLFLOW_S3_ENDPOINT_URL": env["AWS_ENDPOINT_URL"]},
    )
    with server as uri:
        env["MLFLOW_TRACKING_URI"] = uri  # a node reaches the server, not the driver's files
        before = _actor_table(env, address, tmp_path / "before.json")["actors"]
        out = run(["dvc", "repro"], on_cluster, env)
        for stage in ("ingest", "vae"):
            assert f"Stage '{stage}' is cached - skipping run" in out, out[-3000:]
        for stage in ("encode", "reference", "train", "curve", "sample", "evaluate", "register"):
            assert f"Running stage '{stage}'" in out, out[-3000:]
        after = _actor_table(env, address, tmp_path / "after.json")
    placed = {}
    for actor, (name, node) in after["actors"].items():
        if actor not in before:
            placed.setdefault(name.rsplit(".", 1)[-1], []).append(node)
    alive = sorted(after["alive"])
    assert sorted(next(v for k, v in placed.items() if "LatentEncoder" in k)) == alive, placed
    assert sorted(placed["RayTrainWorker"]) == alive and sorted(placed["ShardWorker"]) == alive, placed
    latents = json.loads((on_cluster / "data/latents/manifest.json").read_text())
    assert latents["count"] == 240
    # What the worker node copied from storage, each artifact once, by content: the VAE (for encode and sample),
    # the latents (training) and the EMA weights (sampling).
    copied = node_cache(nodes, 1)
    assert copied["vae"] == [sha256_dir(on_cluster / "models/vae")], copied
    assert copied["latents"] == [sha256_dir(on_cluster / "data/latents")], copied
    assert len(copied["model"]) == 1, copied
    # The checkpoints went through S3 (Ray Train's storage): one object per kept checkpoint, and the driver filled
    # models/checkpoints from them.
    stored = keys(env["AWS_ENDPOINT_URL"], "repro/")
    uploaded = sorted(k.rsplit("/", 1)[-1] for k in stored if k.rsplit("/", 1)[-1].startswith("ckpt-"))
    assert uploaded == sorted(f.name for f in (on_cluster / "models/checkpoints").glob("ckpt-*.pt")), stored
    assert uploaded == ["ckpt-0000010.pt", "ckpt-0000020.pt"], stored
    assert {"images", "vae"} <= {k.split("/")[1] for k in stored}, stored  # what encode's actors read

    hashes = lock_hashes(one_node)
    assert lock_hashes(on_cluster).keys() == hashes.keys()
    assert_same_outputs(
        on_cluster, one_node, hashes, may_differ={"reports/register.json"}, checkpoint_may_differ={"train_params"}
    )
    for ckpt in sorted((one_node / "models/checkpoints").glob("ckpt-*.pt")):  # the run's settings, as recorded
        settings = [
            torch.load(f, weights_only=True)["train_params"] for f in (ckpt, on_cluster / ckpt.relative_to(one_node))
        ]
        assert {k for k in settings[0] if settings[0][k] != settings[1][k]} == {"storage_path"}
    assert differing_fields(on_cluster / "reports/register.json", one_node / "reports/register.json") <= REGISTRY_IDS


REGISTRY_IDS = {"run_id"}  # the MLflow run the model was logged in: another store, another id


def _actor_table(env: dict, address: str, report: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", ACTORS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "RAY_ADDRESS": address, "REPORT_PATH": str(report)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(report.read_text())


# Train only, 2 workers: long enough (LOST_NODE_STEPS tiny steps, a checkpoint every 50) that a node can be lost
# mid-run: the kill comes within a second of the first checkpoint, two thirds of the run before its end. The
# third argument is train.storage_path ("": the driver's paths, which only a node on this machine reads), the
# fourth the steps.
LOST_NODE_STEPS = 150
TRAIN = """
import json, os, sys
from dataclasses import replace
from pathlib import Path
import ray
from ray._private.state import actors
from pipeline.cluster import init_ray
from tiny_train import base_params, run

root, latents, storage = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
init_ray()
earlier = set(actors())  # the cluster's GCS keeps the actors of ended jobs too
p = base_params(num_workers=2, train_steps=int(sys.argv[4]), log_every=50, ckpt_every=50)
run(root, latents, replace(p, storage_path=storage))
workers = [(a["Address"]["NodeID"], a["State"]) for i, a in actors().items()
           if "RayTrainWorker" in a["ActorClassName"] and i not in earlier]
report = {"workers": workers, "alive": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
          "nodes": [n["NodeID"] for n in ray.nodes()]}
open(os.environ["REPORT_PATH"], "w").write(json.dumps(report))
"""


def test_a_lost_node_is_replaced_by_the_remaining_one(cluster, latents, tmp_path):
    """SIGKILL the worker node's raylet once the first checkpoint is in storage (train.storage_path on S3, as on a
    cluster without a shared file system: the worker node cannot read the driver's files): its training worker dies
    with it, Ray Train restarts the group on the head (FailureConfig), from the latest checkpoint, which the new
    group reads back through `ray.train.get_checkpoint()` (models/checkpoints is filled by the driver only after
    the run), and the EMA ends bit for bit as a run on a local one-node Ray. Last in this module: it takes the
    module's cluster down to one node."""
    import psutil
    import torch
    from tiny_train import read_log

    address, cluster_env, nodes = cluster
    env = {**cluster_env, "PYTHONPATH": str(REPO / "tests"), "OMP_NUM_THREADS": "1"}  # the driver's test helpers
    reports = {}
    runs = (("local", "", {}), ("cluster", f"s3://{BUCKET}/lost-node", {"RAY_ADDRESS": address}))
    for where, storage, extra in runs:
        driver = subprocess.Popen(
            [sys.executable, "-c", TRAIN, str(tmp_path / where), str(latents), storage, str(LOST_NODE_STEPS)],
            cwd=REPO,
            env={**env, **extra, "REPORT_PATH": str(tmp_path / f"{where}.json")},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if where == "cluster":

            def stored_steps():  # of the checkpoints Ray Train has uploaded
                stored = keys(env["AWS_ENDPOINT_URL"], "lost-node/")
                return [int(k.rsplit("-", 1)[1].removesuffix(".pt")) for k in stored if k.endswith(".pt")]

            deadline = time.monotonic() + 600
            while not stored_steps() and driver.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            raylets = [c for c in psutil.Process(nodes[1][0].pid).children(recursive=True) if c.name() == "raylet"]
            mid_run = max(stored_steps(), default=LOST_NODE_STEPS) < LOST_NODE_STEPS
            assert len(raylets) == 1 and mid_run, "a raylet to kill, mid-run"
            os.kill(raylets[0].pid, signal.SIGKILL)
        out, _ = driver.communicate(timeout=900)
        assert driver.returncode == 0, out[-3000:]
        reports[where] = json.loads((tmp_path / f"{where}.json").read_text())
    placed = reports["cluster"]
    lost = set(placed["nodes"]) - set(placed["alive"])
    assert len(lost) == 1  # the worker node is gone
    assert any(node in lost for node, _ in placed["workers"])  # it ran a training worker before
    assert len(placed["workers"]) == 4, placed["workers"]  # two worker groups: the first, and its replacement
    ema = [torch.load(tmp_path / w / "dit" / "ema.pt", weights_only=True) for w in ("cluster", "local")]
    assert ema[0].keys() == ema[1].keys() and all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])
    steps = [int(r["step"]) for r in read_log(tmp_path / "cluster" / "train.csv")]
    assert steps == list(range(50, LOST_NODE_STEPS + 1, 50))  # resumed from a checkpoint, not restarted from scratch
