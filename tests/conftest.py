import collections
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

# Belt and braces for runs that bypass `make test`: no hub lookups, Ray locked by a token, no DVC analytics. Set
# before anything imports ray, which reads its auth mode once. The token lives in this process's environment for
# the session (inherited by the Rays the tests start and by `dvc repro`'s stages), so tests leave no token file.
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_AUTH_MODE": "token",
    "DVC_NO_ANALYTICS": "1",
}.items():
    os.environ.setdefault(key, value)
if not os.environ.get("RAY_AUTH_TOKEN_PATH"):
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

# After the environment above: pipeline.train imports ray, which reads RAY_AUTH_MODE once.
import mlflow  # noqa: E402
from synthetic import blob_images, make_shapes, write_images_dir
from tiny_sample import (
    DIFFUSION,
    IMAGE as SAMPLE_IMAGE,
    LATENT as SAMPLE_LATENT,
    NUM_CLASSES as SAMPLE_CLASSES,
    SCALE as SAMPLE_SCALE,
)
from tiny_train import write_latents

from pipeline.artifacts import atomic_write_json, write_manifest
from pipeline.evaluate import evaluate_stage, split_evaluation
from pipeline.formats.model_card import write_model_card
from pipeline.model import DiT
from pipeline.params.evaluate import EvaluateParams
from pipeline.params.load import load_section
from pipeline.params.reference import ReferenceParams
from pipeline.params.register import RegisterParams
from pipeline.params.sample import SampleParams
from pipeline.params.tracking import TrackingParams
from pipeline.params.train import TrainParams
from pipeline.reference import build_reference
from pipeline.sample import read_model_card, run_sample
from pipeline.train import export

# pytest-xdist (`make test` runs two workers, --dist loadgroup --no-loadscope-reorder): a group of tests runs whole on
# one worker (`pytest_xdist_make_scheduler`). Each module is one group, so its module fixtures are set up once;
# modules that share a session fixture form one group, so it too is set up once. The one exception is the session's
# reduced run (`reduced_run`), minutes of `dvc repro` that five modules read: it is made once for all workers,
# through files.
SHARED_GROUPS = {
    "tracking-server": ("test_register", "test_register_concurrency", "test_tracking_uri"),  # tracking_server
}
GROUP_OF = {module: group for group, modules in SHARED_GROUPS.items() for module in modules}
# The order in which workers take the groups: the longest first (measured by `make test`'s --durations, each with
# its fixtures), so that no long one starts last while the other worker sits idle; the rest follow in file order.
# The reduced run is made by the first group that needs it; the others that read it come after groups that do not.
LONGEST_FIRST = (
    "test_code_edits",  # makes the reduced run
    "test_checkpoint_storage",
    "test_cluster",
    "test_register",
    "test_failures",
    "test_pipeline_e2e",
    "test_sweep",
    "test_train",
    "test_encode",
    "test_sample",
)


def group_of(nodeid: str) -> str:
    module = Path(nodeid.split("::", 1)[0]).stem
    return GROUP_OF.get(module, module)


def pytest_collection_modifyitems(config, items):
    rank_of = {}
    for rank, module in enumerate(LONGEST_FIRST):
        rank_of.setdefault(GROUP_OF.get(module, module), rank)  # a shared group ranks by its first module listed
    # Stable: within a group, and among the groups not listed, the file order stays.
    items.sort(key=lambda item: rank_of.get(group_of(item.nodeid), len(LONGEST_FIRST)))


def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup, by `group_of`: pytest-xdist 3.8 names a test's group by rewriting its node id, which pytest
    9.2 ignores (it keeps node ids elsewhere), so its own loadgroup would hand out single tests."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return GroupScheduling(config, log)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`). The test
    machine has 2 shared cores: intra-op threads on small tensors mostly spin against other jobs (up to 30x slower),
    and bit-for-bit comparisons need the same kernels in every run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def write_dit_card():
    """`write(dit_dir) -> ema sha256`: a models/dit card as the train stage writes it (write_model_card), for tests
    of its readers that need no real network (the weights are one small tensor)."""
    from pipeline.formats.model_card import write_model_card

    def write(dit_dir, num_classes: int = 4) -> str:
        latents = {
            "latent_shape": [4, 8, 8],
            "scaling_factor": 0.5,
            "image_size": 16,
            "num_classes": num_classes,
            "class_names": [f"class{c}" for c in range(num_classes)],
        }
        diffusion = {"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True}
        write_model_card(dit_dir, {"w": torch.arange(4.0)}, "DiT-Ti/2", {"input_size": 8}, diffusion, latents, 0)
        return json.loads((dit_dir / "model.json").read_text())["ema_sha256"]

    return write


def _tiny_vae(scaling_factor: float, seed: int = 0, block_out_channels=(8, 16), norm_num_groups: int = 4):
    """A random AutoencoderKL with downsample 2 (16x16 images <-> 4x8x8 latents), in eval mode."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=norm_num_groups,
        sample_size=16,
        scaling_factor=scaling_factor,
    ).eval()


def _perturb(model: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Random non-zero weights everywhere but the fixed pos_embed: adaLN-Zero starts with a zero output, and random
    weights make every check depend on every layer (and samples on the label)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn_like(p) * std)
    return model


@pytest.fixture(scope="session")
def tiny_vae():
    """`tiny_vae(scaling_factor, seed=0, block_out_channels=(8, 16), norm_num_groups=4)` -> a random AutoencoderKL."""
    return _tiny_vae


@pytest.fixture(scope="session")
def perturb():
    """`perturb(model, seed, std=0.05)` -> the model with random non-zero weights (in place)."""
    return _perturb


# --- the registry's tiny upstream: what train, vae, ingest, sample and evaluate write, shared by the registry tests -

REPO = Path(__file__).resolve().parents[1]
# The registry's tiny model (tests/test_registry.py, tests/test_s3.py): depth-1 DiT on 8x8 latents, 3 classes, 16 px.
NAME, EXPERIMENT = "dit-test", "registry-test"
NUM_CLASSES, LATENT, IMAGE, SCALE = 3, [4, 8, 8], 16, 0.5
SAMPLER = {
    "seed": 0,
    "sampler": "dpm-solver++",
    "steps": 3,
    "cfg_scale": 1.5,
    "cfg_channels": None,
    "batch_size": 8,
    "micro_batch": 4,
    "precision": "fp32",
}
TRACKING = TrackingParams(enabled=True, experiment=EXPERIMENT)
NUM_SAMPLES = 24
MAX_LABELS = 8  # register.max_labels_per_request of the tiny model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tiny_vae, perturb):
    """The upstream artifacts shared by all tests: DiT EMA weights, a VAE snapshot, image and latent manifests."""
    root = tmp_path_factory.mktemp("upstream")
    torch.manual_seed(0)
    model = perturb(
        DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=NUM_CLASSES),
        seed=1,
    )
    tiny_vae(SCALE, seed=1, norm_num_groups=8).save_pretrained(root / "vae")
    images, labels = make_shapes(60, NUM_CLASSES, IMAGE, seed=0)
    write_images_dir(root / "images", images, labels, NUM_CLASSES, shard_size=30)
    write_manifest(
        root / "latents",
        "dit-latents",
        1,
        count=60,
        latent_shape=LATENT,
        scaling_factor=SCALE,
        num_classes=NUM_CLASSES,
        class_names=["a", "b", "c"],
        image_size=IMAGE,
    )
    return {
        "root": root,
        "ema": model.state_dict(),
        "config": model.config,
        "vae": root / "vae",
        "images": root / "images",
        "latents": root / "latents",
    }


def training_run() -> str:
    """A finished run in the current store, standing for the train stage's run."""
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        mlflow.create_experiment(
            EXPERIMENT,
            artifact_location=(Path.cwd() / "artifacts").as_uri()
            if mlflow.get_tracking_uri().startswith("sqlite")
            else None,
        )
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name(EXPERIMENT).experiment_id) as run:
        return run.info.run_id


def export_dit(tiny, out_dir: Path, run_id: str | None) -> Path:
    """models/dit (ema.pt, model.json, tracking.json) written by the train stage's own export."""
    ckpt = {
        "ema": tiny["ema"],
        "model_config": tiny["config"],
        "step": 10,
        "mlflow_run_id": run_id,
        "log": [{"step": 10, "loss": 0.5, "mse": 0.4, "vb": 0.1}],
        "timing": {"train_s": 1.0},
    }
    manifest = json.loads((tiny["latents"] / "manifest.json").read_text())
    train_params = load_section(TrainParams, "train", REPO / "params.yaml")
    tracking = TRACKING if run_id else TrackingParams(enabled=False, experiment=EXPERIMENT)
    export(ckpt, manifest, train_params, tracking, out_dir, out_dir.parent / "train.json", wall_s=1.0)
    return out_dir


@pytest.fixture(scope="session")
def evaluation(tiny, tmp_path_factory) -> dict:
    """What the evaluate stage writes for the tiny DiT: `numbers` (metrics/eval.json) and `report`
    (reports/eval.json), from its samples by the sample stage, against a reference stage output of the images."""
    root = tmp_path_factory.mktemp("evaluated")
    build_reference(
        tiny["images"],
        root / "reference",
        ReferenceParams(
            extractor="classifier",
            mode="clean",
            inception_weights="inputs/none",
            classifier_steps=10,
            classifier_batch_size=16,
            classifier_lr=2e-3,
            holdout=12,
            max_features=None,
            batch_size=32,
            use_gpu=False,
            seed=0,
            adm_batch="inputs/none",
        ),
    )
    dit_dir = export_dit(tiny, root / "dit", run_id=None)
    run_sample(
        SampleParams(
            num_fid_samples=NUM_SAMPLES,
            sampler="dpm-solver++",
            steps=3,
            cfg_scale=1.5,
            cfg_channels=None,
            labels="balanced",
            batch_size=8,
            micro_batch=4,
            precision="fp32",
            compile=False,
            num_workers=0,
            use_gpu=False,
            shard_size=8,
            seed=0,
            grid_per_class=2,
        ),
        read_model_card(dit_dir),
        tiny["vae"],
        root / "samples",
    )
    result = evaluate_stage(
        root / "samples",
        root / "reference",
        dit_dir,
        EvaluateParams(pr_k=3, kid_subsets=2, kid_subset_size=12, is_splits=2, batch_size=32, use_gpu=False, seed=0),
    )
    numbers, report = split_evaluation(result)
    return {"numbers": numbers, "report": report}


def write_eval(path: Path, dit_dir: Path, evaluation: dict, **changes) -> tuple[Path, Path]:
    """The evaluate stage's two files (metrics `path`, and its report beside it) with `changes`: fid or kid
    replace a number (None drops it), any other key replaces a fact of the protocol."""
    numbers, protocol = dict(evaluation["numbers"]), dict(evaluation["report"]["protocol"])
    assert protocol["checkpoint_sha256"] == json.loads((dit_dir / "model.json").read_text())["ema_sha256"]
    for key, value in changes.items():
        target = numbers if key in ("fid", "kid") else protocol
        assert key in target, f"{key} is not in the evaluate stage's output"
        target[key] = value
    numbers = {k: v for k, v in numbers.items() if v is not None}
    report = path.with_name(path.stem + ".report.json")
    atomic_write_json(path, numbers)
    atomic_write_json(report, {**evaluation["report"], "protocol": protocol})
    return path, report


def register_cli_args(params, dit_dir, tiny, evaluated: tuple[Path, Path], report) -> list[str]:
    """The register stage's command-line flags (after `python -m stages.register`) for a tiny model's evaluation."""
    return [
        "--params", str(params), "--dit", str(dit_dir), "--vae", str(tiny["vae"]), "--eval", str(evaluated[0]),
        "--eval-report", str(evaluated[1]), "--images", str(tiny["images"]), "--latents", str(tiny["latents"]),
        "--report", str(report),
    ]  # fmt: skip


def register(tiny, dit_dir, evaluated: tuple[Path, Path], out="register.json", params=None, tracking=TRACKING) -> dict:
    from pipeline import register as R

    params = params or RegisterParams(model_name=NAME, metric="fid", max_labels_per_request=MAX_LABELS)
    return R.register(
        params, tracking, dit_dir, tiny["vae"], *evaluated, tiny["images"], tiny["latents"], SAMPLER, Path(out)
    )


# --- a copy of this checkout as a fresh clone has it: the end-to-end and sweep tests ----------------------------


def copy_repo(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files of this checkout, as a fresh clone would have them, into `dest`
    (the caller makes it a git repo)."""
    repo = Path(__file__).resolve().parents[1]
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=repo,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, listed):
        src = repo / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@pytest.fixture(scope="session")
def reduced_run(tmp_path_factory, worker_id):
    """The reduced default after one `dvc repro` in a fresh copy of this checkout (tests/reduced_default.py's
    `FirstRun`), shared by the session: the end-to-end, code-edit, plot, cluster and sweep tests read it, and a test
    that changes the repository works on a copy (`copy_finished_run`), never on this one.

    Under pytest-xdist the first worker that asks makes it in the session's common temp dir, holding a lock that
    the others wait on; they then read its record. A run that failed is not made again: each asker fails."""
    from reduced_default import FirstRun, first_run

    if worker_id == "master":  # one process
        return first_run(tmp_path_factory.mktemp("reduced-run"), REPO)
    root = tmp_path_factory.getbasetemp().parent / "reduced-run"
    record = root.with_suffix(".json")
    with open(root.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this worker dies
        if record.exists():
            return FirstRun.load(record)
        if root.exists():
            pytest.fail(f"the session's reduced run failed on another worker: see its error ({root})")
        root.mkdir()
        made = first_run(root, REPO)
        made.save(record)
        return made


# --- a stage's process killed mid-run: the encode and reference resume tests ---------------------------------------


def kill_once(args: list[str], done, timeout_s: float = 300) -> None:
    """Run `args` with this checkout and tests/ importable, SIGKILL it as soon as `done()` holds, and fail if it
    finished first."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not done() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


# --- servers on loopback ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            proc.drain.join(timeout=5)
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{''.join(proc.output)[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


def start(args: list[str], env: dict) -> subprocess.Popen:
    """A server in its own process group (both servers fork workers, which must end with them). A thread drains its
    output into `proc.output` (the last lines): an unread pipe fills at 64 KB of access logs, and the server then
    blocks on its next log line, mid-request."""
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    proc.output = collections.deque(maxlen=2000)
    proc.drain = threading.Thread(target=lambda: proc.output.extend(proc.stdout), daemon=True)
    proc.drain.start()
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    proc.drain.join(timeout=5)  # the pipe reached its end when the group exited
    proc.stdout.close()


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, artifacts_destination: str, env: dict, timeout_s: float = 180):
    """`mlflow server` on 127.0.0.1 (one worker, its own process group) over `backend_store_uri`, keeping artifacts
    in `artifacts_destination` (a directory or an s3:// URI); yields its URL once /health answers, and stops it
    on the way out. `env` is the server's whole environment (S3 credentials, for an s3:// destination)."""
    port = free_port()
    # MLflow 3's server also starts a pool of job runners (GenAI evaluation jobs) by default: eight processes that
    # poll all the time, about 0.7 of a core between them, for jobs no test submits.
    env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = start(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--backend-store-uri",
            backend_store_uri,
            "--artifacts-destination",
            artifacts_destination,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", server, timeout_s=timeout_s)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory):
    """One `mlflow server` for the session (sqlite backend, artifacts in a directory), started once: ~20 s each on
    2 cores. Tests that share it keep apart by their own model names and runs. Yields (its URL, the directory of
    its artifacts)."""
    root = tmp_path_factory.mktemp("tracking-server")
    with mlflow_server(
        f"sqlite:///{root / 'server.db'}", str(root / "artifacts"), env={**os.environ, "MLFLOW_TRACKING_URI": ""}
    ) as url:
        yield url, root / "artifacts"


# --- a local S3-compatible server (moto on 127.0.0.1): the S3 and checkpoint-storage tests ---------------------

BUCKET = "dit"
# Fake keys for the fake server. A user exports real ones (or uses a profile / instance role) the same way.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test-key-id-4f1c",
    "AWS_SECRET_ACCESS_KEY": "test-secret-9b2e",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3():
    """(endpoint URL, environment with the credentials and the venv's bin first on PATH); an empty bucket `dit` on a
    fresh server."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        **CREDENTIALS,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
    ).create_bucket(Bucket=BUCKET)
    yield endpoint, env
    server.stop()


def keys(endpoint: str, prefix: str) -> list[str]:
    """The object keys under `prefix` in the bucket."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
    )
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture
def aws_env(s3, monkeypatch):
    """This process's environment pointed at the S3 server, as a user exports it for pyarrow, boto and Ray. A Ray
    already running in this process is shut down: the next one starts with these variables, as its workers need
    them. Yields the endpoint."""
    import ray

    endpoint, _ = s3
    ray.shutdown()
    for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    yield endpoint
    ray.shutdown()  # its workers hold this test's credentials


# --- the train and encode tests' inputs, shared with the curve, failure and cluster tests --------------------------


@pytest.fixture(scope="session")
def latents(tmp_path_factory) -> Path:
    """tests/tiny_train.py's 64-example latents artifact."""
    return write_latents(tmp_path_factory.mktemp("latents") / "latents")


@pytest.fixture(scope="session")
def encode_inputs(tmp_path_factory, tiny_vae) -> dict:
    root = tmp_path_factory.mktemp("encode")
    images, labels = blob_images(20, 16, seed=1)
    images_dir = write_images_dir(root / "images", images, labels, 3, shard_size=8)  # shards of 8, 8 and 4 rows
    vae_dir = root / "vae"
    tiny_vae(scaling_factor=0.7).save_pretrained(vae_dir)
    return {"images_dir": images_dir, "vae_dir": vae_dir, "images": images, "labels": labels}


@pytest.fixture(scope="session")
def sample_dirs(tmp_path_factory, tiny_vae, perturb):
    """A models/dit (ema.pt + model.json + tracking.json) and a models/vae snapshot, as train and vae write them."""
    root = tmp_path_factory.mktemp("models")
    dit_dir, vae_dir = root / "dit", root / "vae"
    dit_dir.mkdir()
    model = perturb(
        DiT(
            input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=SAMPLE_CLASSES
        ),
        seed=2,
    ).eval()
    latents = {
        "latent_shape": list(SAMPLE_LATENT),
        "scaling_factor": SAMPLE_SCALE,
        "image_size": SAMPLE_IMAGE,
        "num_classes": SAMPLE_CLASSES,
        "class_names": ["zero", "one", "two", "three"],
    }
    write_model_card(dit_dir, model.state_dict(), "tiny", model.config, DIFFUSION, latents, train_steps=0)
    (dit_dir / "tracking.json").write_text(json.dumps({"mlflow_run_id": None, "tracking_uri": None}))
    tiny_vae(SAMPLE_SCALE, seed=1, norm_num_groups=8).save_pretrained(vae_dir)
    return dit_dir, vae_dir
