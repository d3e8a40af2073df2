"""The served model's bounds (pipeline/serving.py, pipeline/pyfunc.py): the request checks, one generation at a time,
and a real `mlflow models serve` on 127.0.0.1 refusing hostile requests with a 400 and one sentence, fast and in
bounded memory, while good requests keep their pixels. Tiny DiT and VAE from tests/conftest.py, CPU only."""

import json
import math
import os
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
from conftest import IMAGE, MAX_LABELS, NUM_CLASSES, SAMPLER, export_dit, free_port, start, stop, wait_http

from pipeline import serving
from pipeline.diffusion import SAMPLERS

MLFLOW = Path(sys.executable).parent / "mlflow"
RSS_LIMIT = 4 * 2**30  # bytes: the server and its children while they answer hostile requests
FAST_S = 1.0  # a refusal comes before any generation

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def check(labels, **params):
    return serving.check_request(
        labels, params, SAMPLER, num_classes=NUM_CLASSES, max_labels=MAX_LABELS, diffusion_steps=1000
    )


# --- the request checks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels, params, message",
    [
        (list(range(3)) * 3, {}, r"at most 8 images, got 9: split it"),
        ([[0, 1]], {}, r"flat list of class labels, got an array of shape \(1, 2\)"),
        ([-1], {}, r"class labels in \[0, 3\), got -1"),
        ([0, 3], {}, r"class labels in \[0, 3\), got 3"),
        ([0.5], {}, r"integer class labels in \[0, 3\), got fractional numbers such as 0.5"),
        ([True], {}, r"got true/false such as True"),
        (["a"], {}, r"got text such as 'a'"),
        ([0], {"steps": 0}, r"steps must be an integer in \[1, 1000\] for dpm-solver\+\+"),
        ([0], {"steps": 10**9}, r"steps must be an integer in \[1, 1000\]"),
        ([0], {"steps": 1001, "sampler": "ddim"}, r"in \[1, 1000\] for ddim"),
        ([0], {"steps": 2.5}, r"steps must be an integer"),
        ([0], {"cfg_scale": math.nan}, r"cfg_scale must be a finite number >= 0, got nan"),
        ([0], {"cfg_scale": math.inf}, r"finite"),
        ([0], {"cfg_scale": -1.0}, r">= 0"),
        ([0], {"seed": -1}, r"seed must be an integer in \[0, 9223372036854775807\]"),
        ([0], {"seed": 2**70}, r"seed must be"),
        ([0], {"sampler": "euler"}, r"sampler must be one of ddpm, ddim, dpm-solver\+\+, got 'euler'"),
    ],
)
def test_requests_outside_the_bounds_are_refused_in_one_sentence(labels, params, message):
    with pytest.raises(serving.RequestError, match=message) as e:
        check(labels, **params)
    text = str(e.value)
    assert "\n" not in text and text.endswith(".") and text.count(". ") == 0, text


def test_requests_within_the_bounds_pass():
    r = check([0, 2, 1], seed=2**63 - 1, steps=1000, cfg_scale=0.0)
    assert r.labels.dtype == np.int64 and r.labels.tolist() == [0, 2, 1] and r.steps == 1000
    assert check(np.array([[1], [2]])).labels.tolist() == [1, 2]  # one DataFrame column
    assert check([]).labels.shape == (0,)
    assert {check([0], sampler=s, steps=1000).sampler for s in SAMPLERS} == set(SAMPLERS)
    assert check(list(range(3)) + [0] * (MAX_LABELS - 3)).labels.size == MAX_LABELS


def test_long_refused_values_are_cut_in_the_message():
    with pytest.raises(serving.RequestError) as e:
        check([0], sampler="x" * 10_000)
    assert len(str(e.value)) < 200


# --- one generation at a time ------------------------------------------------------------------------------------


def write_limits(path: Path, max_labels: int = MAX_LABELS) -> str:
    return str(serving.write_limits(path, max_labels))


@pytest.fixture(scope="module")
def artifacts(tiny, tmp_path_factory) -> dict:
    """The pyfunc's artifacts as `log_pyfunc` records them, with the sample defaults in tf32 so that the TF32
    switches it flips are visible (they are plain flags on a CPU build)."""
    root = tmp_path_factory.mktemp("pyfunc")
    (root / "sampler.json").write_text(json.dumps({**SAMPLER, "precision": "tf32"}))
    return {
        "dit": str(export_dit(tiny, root / "dit", run_id=None)),
        "vae": str(tiny["vae"]),
        "sampler": str(root / "sampler.json"),
        "limits": write_limits(root / serving.LIMITS_FILE),
    }


def test_concurrent_predicts_do_not_interleave_their_precision_switches(artifacts, monkeypatch):
    """float32_mode sets the process-wide TF32 switches and restores them on exit: two overlapping requests would
    restore them under each other. Predict serialises generation, so every sampler call sees tf32's switches and
    only one runs at a time; afterwards the process's switches are as before."""
    import torch

    from pipeline import generate
    from pipeline.pyfunc import DiTImageModel

    model = DiTImageModel()
    model.load_context(types.SimpleNamespace(artifacts=artifacts))
    real, running, seen, lock = generate.diffusion_sample, [0], [], threading.Lock()

    def spy(*args, **kwargs):
        with lock:
            running[0] += 1
            seen.append((running[0], torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        time.sleep(0.3)  # long enough for the other thread to enter if nothing stops it
        with lock:
            seen.append((running[0], torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            running[0] -= 1
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "diffusion_sample", spy)
    results, before = [None, None], (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)

    def call(i):
        results[i] = model.predict(None, np.array([0, 1]), params={"seed": 5})

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert seen and all(entry == (1, True, True) for entry in seen), seen
    assert np.array_equal(results[0], results[1])
    assert after == (False, False)


def test_a_model_without_recorded_limits_is_refused_at_load(artifacts):
    from pipeline.artifacts import ArtifactError
    from pipeline.pyfunc import DiTImageModel

    with pytest.raises(ArtifactError, match="dvc repro register"):
        DiTImageModel().load_context(
            types.SimpleNamespace(artifacts={k: v for k, v in artifacts.items() if k != "limits"})
        )


# --- over HTTP, against `mlflow models serve` ------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """`mlflow models serve` of the tiny model logged by log_pyfunc (fp32 defaults, MAX_LABELS per request) on
    127.0.0.1; yields (base URL, the server process)."""
    from pipeline.pyfunc import log_pyfunc

    root = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("serve-test", artifact_location=(root / "artifacts").as_uri())
    dit_dir = export_dit(tiny, root / "dit", run_id=None)
    with mlflow.start_run(experiment_id=experiment):
        model_uri = log_pyfunc(dit_dir, tiny["vae"], SAMPLER, MAX_LABELS).model_uri
    port = free_port()
    # `mlflow models serve` execs a bare `uvicorn`: the venv's bin must be on PATH (an activated venv)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{MLFLOW.parent}{os.pathsep}{os.environ['PATH']}",
    }
    proc = start(
        [str(MLFLOW), "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout_s=180)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop(proc)


def invoke(url: str, body: str | dict, timeout_s: float = 120) -> tuple[int, dict, float]:
    """(HTTP status, the JSON answer, seconds) of one POST to /invocations."""
    data = (body if isinstance(body, str) else json.dumps(body)).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, payload = e.code, e.read()
    return status, json.loads(payload), time.monotonic() - started


def tree_rss(proc) -> int:
    """Resident bytes of the server process and all its children (uvicorn and its workers)."""
    root = psutil.Process(proc.pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


GOOD = {"inputs": [0, 2], "params": {"seed": 7}}
# (name, raw JSON body, what the refusal's message must say). NaN is a literal of Python's JSON, which the server
# parses.
HOSTILE = [
    ("oversized", json.dumps({"inputs": list(range(NUM_CLASSES)) * 4000}), "at most 8 images, got 12000"),
    ("huge steps", json.dumps({"inputs": [0], "params": {"steps": 10**9}}), "steps must be an integer in [1, 1000]"),
    ("NaN guidance", '{"inputs": [0], "params": {"cfg_scale": NaN}}', "cfg_scale must be a finite number >= 0"),
    ("negative label", json.dumps({"inputs": [1, -1]}), "class labels in [0, 3), got -1"),
    ("float label", json.dumps({"inputs": [0.5]}), "integer class labels"),
    ("string label", json.dumps({"inputs": ["cat"]}), "integer class labels"),
    ("huge seed", json.dumps({"inputs": [0], "params": {"seed": 2**70}}), "seed must be an integer"),
    ("wrong param type", json.dumps({"inputs": [0], "params": {"steps": "many"}}), "'steps'"),  # MLflow's check
]


@pytest.mark.slow  # a real `mlflow models serve`
def test_hostile_requests_are_refused_fast_and_good_ones_keep_their_pixels(server):
    url, proc = server
    status, answer, _ = invoke(url, GOOD)
    assert status == 200, answer
    reference = np.array(answer["predictions"], dtype=np.uint8)
    assert reference.shape == (2, IMAGE, IMAGE, 3)

    peak, stop_watch = [tree_rss(proc)], threading.Event()

    def watch():
        while not stop_watch.is_set():
            peak[0] = max(peak[0], tree_rss(proc))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for name, body, message in HOSTILE:
            status, answer, seconds = invoke(url, body, timeout_s=30)
            print(f"{name}: {status} in {seconds:.3f} s: {answer.get('message')!r}")
            assert status == 400, (name, answer)
            assert message in answer["message"] and "stack_trace" not in answer, (name, answer)
            assert seconds < FAST_S, (name, seconds)
            if name != "wrong param type":  # MLflow's own type check words that one
                sentence = answer["message"].split("Error: ", 1)[-1]
                assert "\n" not in sentence and sentence.endswith("."), sentence
            status, answer, _ = invoke(url, GOOD)  # between them, the same pixels for the same seed
            assert status == 200 and np.array_equal(np.array(answer["predictions"], np.uint8), reference), name
    finally:
        stop_watch.set()
        watcher.join()
    print(f"server RSS (server + children) peak during the hostile requests: {peak[0] / 2**20:.0f} MiB")
    assert peak[0] < RSS_LIMIT

    answers = [None, None]

    def client(i):
        answers[i] = invoke(url, GOOD)

    clients = [threading.Thread(target=client, args=(i,)) for i in range(2)]  # two clients at once
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    for status, answer, _ in answers:
        assert status == 200 and np.array_equal(np.array(answer["predictions"], np.uint8), reference)
