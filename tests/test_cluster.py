"""A real two-node Ray cluster on this machine, locked with a token, started with the commands of the README's
"From a laptop to a cluster": `ray start --head` plus `ray start --address=...`, each node with its own CPU and
temp dir. Clients without the token are refused; one with it joins through `pipeline.cluster.init_ray`, and the
`encode` stage's actors, `train`'s DDP workers and `sample`'s actors spread one per node, with the bytes of a single
process (encode) or of a local one-node Ray (train, sample)."""
import contextlib
import dataclasses
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

from conftest import BUCKET, CREDENTIALS, keys
from pipeline.encode import encode_local
from tiny_encode import PARAMS as ENCODE_PARAMS
from tiny_encode import shard_hashes

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
REPO = Path(__file__).resolve().parents[1]
# Ray rewrites 127.0.0.1 and localhost in an address to this machine's network address, so that a node elsewhere
# could use it; any other loopback address is kept, and the head's GCS listens on it too. Traffic stays on `lo`.
JOIN_HOST = "127.0.0.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hidden_paths() -> list[Path]:
    """What a node without the project must not read: this checkout, the venv and the checkout holding the venv
    (where its editable install points)."""
    paths = {REPO}
    if sys.prefix != sys.base_prefix:  # a venv: hide it and the checkout it lives in
        paths |= {Path(sys.prefix), Path(sys.prefix).parent}
    return sorted(p for p in paths if not any(q in p.parents for q in paths))  # covering a parent hides the rest


def without_the_project(cmd: list[str], node_env: str) -> list[str]:
    """`cmd` in a mount namespace of its own, as a node that has Python and the dependencies but not the project:
    the venv is bound at `node_env` (the same packages, installed elsewhere), then the checkout and the venv's own
    path are covered by empty tmpfs mounts. The node's workers get `pipeline` only through Ray's runtime_env."""
    python = f"{node_env}/bin/python"
    script = [f"mount --bind {sys.prefix} {node_env}"]
    script += [f"mount -t tmpfs -o size=1m tmpfs {path}" for path in hidden_paths()]
    script.append(" ".join(["exec", python, "-m", "ray.scripts.scripts", *cmd[1:]]))
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-ec", " && ".join(script)]


def start_node(env: dict, head_port: int, head: bool, num_cpus: int) -> tuple[subprocess.Popen, str]:
    """`ray start --block` in its own process group: SIGTERM to it stops this node's processes and no other Ray's
    (`ray stop` would stop every Ray on the machine). Short temp dirs: Ray's socket paths must stay under 108 bytes.
    The worker node runs without the project (`without_the_project`)."""
    temp_dir = tempfile.mkdtemp(prefix="ray-")
    cmd = [RAY, "start", "--block", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1",
           "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    if head:
        cmd += ["--head", f"--port={head_port}", "--include-dashboard=false"]
    else:
        cmd += [f"--address={JOIN_HOST}:{head_port}"]
        Path(temp_dir, "env").mkdir()
        cmd = without_the_project(cmd, f"{temp_dir}/env")
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


@contextlib.contextmanager
def two_nodes(token_dir: Path, s3_endpoint: str):
    """Yields (address, env of a client holding the token, [(head process, temp dir), (worker ...)])."""
    token_file = token_dir / "auth_token"
    with open(os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_")) and k != "PYTHONPATH"}
    env.update(CREDENTIALS, AWS_ENDPOINT_URL=s3_endpoint, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    port = free_port()
    nodes = [start_node(env, port, head=True, num_cpus=2)]
    try:
        wait_for_port(port, nodes[0][0])
        nodes.append(start_node(env, port, head=False, num_cpus=1))
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
    as a cluster's nodes hold theirs (train.storage_path)."""
    with two_nodes(tmp_path_factory.mktemp("ray-token"), s3[0]) as (address, env, _):
        yield address, env


# Runs in a fresh process (Ray reads its auth settings once per process): joins through the project's init_ray,
# waits for both nodes, then spreads two actors and reports the node each one runs on.
CLIENT = """
import json, os, time
import ray
import pipeline
from pipeline.cluster import init_ray
from pipeline.provenance import stamp

init_ray()
deadline = time.monotonic() + 120
while len(alive := [n["NodeID"] for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
    time.sleep(0.5)

@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
class Where:
    def node(self, checkout):
        import pipeline
        from pipeline.provenance import stamp
        return {"node": ray.get_runtime_context().get_node_id(), "pipeline": pipeline.__file__,
                "sees_checkout": os.path.exists(os.path.join(checkout, "pipeline", "__init__.py")),
                "code": stamp("pipeline.train")["code"]}

checkout = os.path.dirname(os.path.dirname(pipeline.__file__))
actors = [Where.remote() for _ in range(2)]
report = {"alive": alive, "actors": ray.get([a.node.remote(checkout) for a in actors], timeout=120),
          "checkout": checkout, "code": stamp("pipeline.train")["code"]}
open(os.environ["REPORT_PATH"], "w").write(json.dumps(report))
"""


# The scripts write their report to REPORT_PATH, not stdout: Ray forwards raylet warnings to the driver's stdout
# whenever they come, even after the script's last print (CI once parsed such a warning as the report).
def client(env: dict, address: str, script: str = CLIENT, report: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                            env={**env, "RAY_ADDRESS": address, "REPORT_PATH": str(report or os.devnull)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_only_a_client_with_the_token_gets_in_and_work_lands_on_both_nodes(cluster, tmp_path):
    address, env = cluster
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    # Plain Ray clients, as an outsider would run them: one with a token of its own, one that sends none (auth mode
    # unset and no ~/.ray/auth_token: an address given explicitly does not turn token auth on in the client).
    refused = {
        "wrong token": client({**no_token, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)},
                              address, "import ray; ray.init()"),
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


# The encode stage's library call on the cluster, then the nodes its encoder actors ran on (from the GCS's actor
# table: the state API would need the dashboard, which the head runs without).
ENCODE = """
import dataclasses, json, os, sys
import ray
from ray._private.state import actors
from pipeline.encode import EncodeParams, run_encode

params, images_dir, vae_dir, out = json.loads(sys.argv[1])
run_encode(EncodeParams(**params), images_dir, vae_dir, out, out + ".json")
nodes = [a["Address"]["NodeID"] for a in actors().values() if "LatentEncoder" in a["ActorClassName"]]
report = {"nodes": nodes, "alive": [n["NodeID"] for n in ray.nodes() if n["Alive"]]}
open(os.environ["REPORT_PATH"], "w").write(json.dumps(report))
"""


def test_encode_spreads_one_actor_per_node_with_single_process_bytes(cluster, encode_inputs, tmp_path):
    address, env = cluster
    params = dataclasses.replace(ENCODE_PARAMS, store="sample", num_actors=2, batch_size=3)
    encode_local(params, encode_inputs["images_dir"], encode_inputs["vae_dir"], tmp_path / "local")
    args = [dataclasses.asdict(params), str(encode_inputs["images_dir"]), str(encode_inputs["vae_dir"]), str(tmp_path / "cluster")]
    done = subprocess.run([sys.executable, "-c", ENCODE, json.dumps(args)], cwd=REPO,
                          env={**env, "RAY_ADDRESS": address, "REPORT_PATH": str(tmp_path / "report.json")},
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["nodes"]) == 2 and sorted(report["nodes"]) == sorted(report["alive"])
    assert shard_hashes(tmp_path / "cluster") == shard_hashes(tmp_path / "local")
    assert (tmp_path / "cluster" / "manifest.json").read_bytes() == (tmp_path / "local" / "manifest.json").read_bytes()


# The train and sample stages' library calls (tiny DiT, 6 steps; 16 samples) on whichever Ray RAY_ADDRESS names, or a
# local one without it; then the nodes their Ray Train workers and sampling actors ran on.
TRAIN_AND_SAMPLE = """
import json, os, sys
from pathlib import Path
import ray
from ray._private.state import actors
from pipeline import sample as S
from pipeline.cluster import init_ray
from pipeline.formats.model_card import read_model_card
from tiny_sample import params
from tiny_train import base_params, run

root, latents, vae_dir = map(Path, sys.argv[1:4])
init_ray()
run(root / "train", latents, base_params(num_workers=2, train_steps=6, log_every=2, ckpt_every=3,
                                         storage_path=sys.argv[4]))
S.run_sample(params(num_workers=2, num_fid_samples=16, shard_size=8), read_model_card(root / "train" / "dit"),
             vae_dir, root / "sample")
nodes = lambda name: [a["Address"]["NodeID"] for a in actors().values() if name in a["ActorClassName"]]
report = {"train": nodes("RayTrainWorker"), "sample": nodes("ShardWorker"),
          "alive": [n["NodeID"] for n in ray.nodes() if n["Alive"]]}
open(os.environ["REPORT_PATH"], "w").write(json.dumps(report))
"""


def test_train_and_sample_run_one_worker_per_node_with_single_node_bytes(cluster, tmp_path, tiny_vae):
    """Train with 2 DDP workers over gloo and sample with 2 actors, on the cluster and on a local one-node Ray. On
    the cluster the checkpoints go through S3 (train.storage_path), locally straight to models/checkpoints."""
    import numpy as np
    import torch

    from tiny_train import write_latents

    address, env = cluster
    latents = write_latents(tmp_path / "latents")
    tiny_vae(0.5, seed=1, norm_num_groups=8).save_pretrained(tmp_path / "vae")  # 16 px <-> 4x8x8, as the latents
    env = {**env, "PYTHONPATH": str(REPO / "tests"), "OMP_NUM_THREADS": "1"}  # the driver's test helpers
    reports = {}
    storage = {"cluster": f"s3://{BUCKET}/cluster-train", "local": ""}
    for where, extra in (("cluster", {"RAY_ADDRESS": address}), ("local", {})):
        done = subprocess.run([sys.executable, "-c", TRAIN_AND_SAMPLE, str(tmp_path / where), str(latents),
                               str(tmp_path / "vae"), storage[where]], cwd=REPO, capture_output=True, text=True, timeout=900,
                              env={**env, **extra, "REPORT_PATH": str(tmp_path / f"{where}.json")})
        assert done.returncode == 0, done.stderr[-3000:]
        reports[where] = json.loads((tmp_path / f"{where}.json").read_text())
    placed = reports["cluster"]
    assert len(set(placed["alive"])) == 2
    assert sorted(placed["train"]) == sorted(placed["alive"])  # one DDP worker per node
    assert sorted(placed["sample"]) == sorted(placed["alive"])  # one sampling actor per node
    uploaded = sorted(k.rsplit("/", 1)[-1] for k in keys(env["AWS_ENDPOINT_URL"], "cluster-train/") if k.endswith(".pt"))
    assert uploaded == ["ckpt-0000003.pt", "ckpt-0000006.pt"], uploaded
    assert [sorted(f.name for f in (tmp_path / w / "train" / "checkpoints").glob("ckpt-*.pt"))
            for w in ("cluster", "local")] == [uploaded, uploaded]  # filled from S3 by the driver
    ema = [torch.load(tmp_path / w / "train" / "dit" / "ema.pt", weights_only=True) for w in ("cluster", "local")]
    assert ema[0].keys() == ema[1].keys() and all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])
    samples = [np.load(tmp_path / w / "sample" / "samples.npz") for w in ("cluster", "local")]
    np.testing.assert_array_equal(samples[0]["arr_0"], samples[1]["arr_0"])


# Train only, 2 workers: long enough (300 tiny steps, a checkpoint every 50) that a node can be lost mid-run.
TRAIN = """
import json, os, sys
from pathlib import Path
import ray
from ray._private.state import actors
from pipeline.cluster import init_ray
from tiny_train import base_params, run

root, latents = map(Path, sys.argv[1:3])
init_ray()
run(root, latents, base_params(num_workers=2, train_steps=300, log_every=50, ckpt_every=50))
workers = [(a["Address"]["NodeID"], a["State"]) for a in actors().values() if "RayTrainWorker" in a["ActorClassName"]]
report = {"workers": workers, "alive": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
          "nodes": [n["NodeID"] for n in ray.nodes()]}
open(os.environ["REPORT_PATH"], "w").write(json.dumps(report))
"""


def test_a_lost_node_is_replaced_by_the_remaining_one(tmp_path, s3):
    """SIGKILL the worker node's raylet once the first checkpoint is written: its training worker dies with it,
    Ray Train restarts the group on the head (FailureConfig), from the latest checkpoint, and the EMA ends bit for
    bit as a run on a local one-node Ray."""
    import psutil
    import torch

    from tiny_train import read_log, write_latents

    latents = write_latents(tmp_path / "latents")
    with two_nodes(tmp_path, s3[0]) as (address, env, nodes):
        env = {**env, "PYTHONPATH": str(REPO / "tests"), "OMP_NUM_THREADS": "1"}  # the driver's test helpers
        reports = {}
        for where, extra in (("local", {}), ("cluster", {"RAY_ADDRESS": address})):
            driver = subprocess.Popen([sys.executable, "-c", TRAIN, str(tmp_path / where), str(latents)], cwd=REPO,
                                      env={**env, **extra, "REPORT_PATH": str(tmp_path / f"{where}.json")},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if where == "cluster":
                first = tmp_path / where / "checkpoints" / "ckpt-0000050.pt"
                deadline = time.monotonic() + 600
                while not first.exists() and driver.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
                raylets = [c for c in psutil.Process(nodes[1][0].pid).children(recursive=True) if c.name() == "raylet"]
                last = tmp_path / where / "checkpoints" / "ckpt-0000300.pt"
                assert len(raylets) == 1 and first.exists() and not last.exists(), "a raylet to kill, mid-run"
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
    assert steps == list(range(50, 301, 50))  # resumed from a checkpoint, not restarted from scratch
