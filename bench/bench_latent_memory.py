"""Host memory of the training workers on one node, memory-mapped latents against a private copy per worker.

Writes a synthetic latents artifact of ImageNet-256's shape at 1/10 scale with the encode stage's writer (128,000
images, both flips, mean + std at 4x32x32 fp16, shards of 10,000 rows as profiles/imagenet256.yaml: 4.2 GB), then
runs the train stage's data path (pipeline.train.LatentBatches) in 1 and 2 worker processes, each drawing its rank's
part of every global batch for one epoch (--steps), and samples their PSS (/proc/<pid>/smaps_rollup: pages shared
with other processes, such as the page cache's pages of a mapped file, count once per node) every 0.1 s:

- mmap:   the stage's loader (pipeline.formats.latents.open_latents), with 1 and 2 workers;
- copy:   the loader before it (each shard read with safetensors, then torch.cat: a private copy per worker, twice
          its size while concatenating), with 1 worker (--copy-workers 2 needs ~17 GB more).

Prints the peak PSS of each worker and of the node (the sum over workers at one instant), the node's ratio at 2
workers to 1 (goal <= 1.2) and the mean time of a step's batch (draw, gather, posterior sample, scale) in each run;
then the median batch time of both loaders in one process, alternating step by step (a fair ratio on a shared
machine), over a first pass (which maps the pages into the process) and a second; and checks that both loaders
give the same batches (sha256 over every step's x and y, and equality).

    df -h /tmp && python bench/bench_latent_memory.py          # ~4.2 GB under /tmp, deleted at the end
    python bench/bench_latent_memory.py --images 12800          # a quick look at 1/100 scale
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

import pipeline.train as T
from pipeline.formats.latents import open_latents, read_latents_manifest, write_latents_manifest, write_shard

LATENT_SHAPE = (4, 32, 32)  # ImageNet-256 through the SD-VAE
SCALING_FACTOR = 0.18215


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128_000, help="1/10 of ImageNet-1k's 1,281,167")
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--global-batch", type=int, default=256, help="the paper's")
    parser.add_argument("--steps", type=int, default=None, help="steps per worker (default: one epoch)")
    parser.add_argument("--copy-workers", type=int, default=1, choices=[0, 1, 2])
    parser.add_argument("--dir", default=None, help="where to write the set (default: a temp dir, deleted after)")
    parser.add_argument("--worker", nargs=4, metavar=("LOADER", "RANK", "WORLD", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--latents", help=argparse.SUPPRESS)
    return parser.parse_args()


def write_synthetic(out: Path, images: int, shard_size: int) -> None:
    """Random fp16 posteriors (values do not matter for memory or speed) through the encode stage's writer."""
    rng = np.random.default_rng(0)
    out.mkdir(parents=True)
    shards = []
    for s, start in enumerate(range(0, images, shard_size)):
        n = min(shard_size, images - start)
        arrays = {
            "label": rng.integers(0, 1000, n, dtype=np.int64),
            "mean": rng.standard_normal((n, 2, *LATENT_SHAPE), dtype=np.float32).astype(np.float16),
            "std": (rng.random((n, 2, *LATENT_SHAPE), dtype=np.float32) * 0.1).astype(np.float16),
        }
        shards.append(write_shard(out, f"latents-{s:05d}.safetensors", arrays))
    write_latents_manifest(
        out,
        count=images,
        latent_shape=list(LATENT_SHAPE),
        dtype="float16",
        flip=True,
        store="posterior",
        scaling_factor=SCALING_FACTOR,
        num_classes=1000,
        shards=shards,
    )


def load_copy(latents_dir: str) -> dict[str, torch.Tensor]:
    """The loader before memory-mapping: every shard into memory, then one torch.cat per key."""
    parts: dict[str, list[torch.Tensor]] = {}
    for shard in read_latents_manifest(latents_dir)["shards"]:
        with safe_open(str(Path(latents_dir) / shard["file"]), "pt") as f:
            for key in f.keys():
                parts.setdefault(key, []).append(f.get_tensor(key))
    return {key: torch.cat(values) for key, values in parts.items()}


def worker(latents_dir: str, loader: str, rank: int, world: int, steps: int, global_batch: int) -> None:
    """One training worker's data path; prints its timings and digest, then waits for the parent's last sample."""
    torch.set_num_threads(1)  # a training worker's data path; the node's cores are shared
    start = time.perf_counter()
    latents = open_latents(latents_dir)[1] if loader == "mmap" else load_copy(latents_dir)
    data = T.LatentBatches(latents, SCALING_FACTOR, seed=0, device=torch.device("cpu"))
    load_s = time.perf_counter() - start
    digest, batch_s = hashlib.sha256(), []
    for step in range(steps):
        torch.manual_seed(T.step_seed(0, step, rank))  # as run_step
        t0 = time.perf_counter()
        x, y = data.batch(step, rank, world, global_batch)
        batch_s.append(time.perf_counter() - t0)
        digest.update(x.numpy().tobytes())
        digest.update(y.numpy().tobytes())
    print(
        json.dumps({"load_s": load_s, "batch_ms": 1e3 * float(np.mean(batch_s)), "sha256": digest.hexdigest()}),
        flush=True,
    )
    sys.stdin.readline()  # stay alive (and mapped) until the parent has sampled the final PSS


def time_both(latents_dir: str, steps: int, global_batch: int) -> None:
    """Step time of both loaders in one process, alternating step by step, so that the load of a shared machine
    falls on both alike: prints their median batch time in ms and whether every batch was the same."""
    torch.set_num_threads(1)
    loaders = {
        "mmap": T.LatentBatches(open_latents(latents_dir)[1], SCALING_FACTOR, 0, torch.device("cpu")),
        "copy": T.LatentBatches(load_copy(latents_dir), SCALING_FACTOR, 0, torch.device("cpu")),
    }
    times, same = {name: [] for name in loaders}, True
    for step in range(2 * steps):  # the first epoch maps the pages into this process; the second finds them mapped
        out = {}
        for name, data in loaders.items() if step % 2 else reversed(loaders.items()):
            torch.manual_seed(T.step_seed(0, step, 0))
            t0 = time.perf_counter()
            out[name] = data.batch(step, 0, 1, global_batch)
            times[name].append(time.perf_counter() - t0)
        same &= all(torch.equal(a, b) for a, b in zip(out["mmap"], out["copy"]))
    print(
        json.dumps(
            {
                "same": same,
                **{
                    f"{name}{epoch}": 1e3 * float(np.median(t[(epoch - 1) * steps : epoch * steps]))
                    for name, t in times.items()
                    for epoch in (1, 2)
                },
            }
        ),
        flush=True,
    )


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Pss in /proc/{pid}/smaps_rollup")


def run_workers(latents_dir: Path, loader: str, world: int, steps: int, global_batch: int) -> dict:
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--latents",
                str(latents_dir),
                "--worker",
                loader,
                str(rank),
                str(world),
                str(steps),
            ]
            + ["--global-batch", str(global_batch)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    peak_worker, peak_node = [0] * world, 0
    reports: list[dict | None] = [None] * world
    while any(r is None for r in reports):
        now = [pss_kib(p.pid) for p in procs]
        peak_worker = [max(a, b) for a, b in zip(peak_worker, now)]
        peak_node = max(peak_node, sum(now))
        for i, p in enumerate(procs):
            if reports[i] is None and p.poll() is not None:
                raise RuntimeError(f"{loader} worker {i} exited with {p.returncode}")
        time.sleep(0.1)
        for i, p in enumerate(procs):  # a worker prints exactly one line, then waits on stdin
            if reports[i] is None and _readable(p.stdout):
                reports[i] = json.loads(p.stdout.readline())
    now = [pss_kib(p.pid) for p in procs]  # all done and still mapped: the final state
    peak_worker, peak_node = [max(a, b) for a, b in zip(peak_worker, now)], max(peak_node, sum(now))
    for p in procs:
        p.communicate("\n", timeout=60)
    return {
        "loader": loader,
        "workers": world,
        "peak_worker_gib": [k / 2**20 for k in peak_worker],
        "peak_node_gib": peak_node / 2**20,
        "reports": reports,
    }


def _readable(stream) -> bool:
    import select

    return bool(select.select([stream], [], [], 0)[0])


def main() -> None:
    args = parse_args()
    if args.worker:
        loader, rank, world, steps = args.worker
        if loader == "both":
            time_both(args.latents, int(steps), args.global_batch)
        else:
            worker(args.latents, loader, int(rank), int(world), int(steps), args.global_batch)
        return
    steps = args.steps or args.images // args.global_batch
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="latent-memory-"))
    latents_dir = tmp / "latents"
    try:
        start = time.perf_counter()
        write_synthetic(latents_dir, args.images, args.shard_size)
        size_gb = sum(f.stat().st_size for f in latents_dir.glob("*.safetensors")) / 1e9
        print(
            f"wrote {args.images} images x 2 flips, mean+std {LATENT_SHAPE} fp16: {size_gb:.2f} GB in "
            f"{time.perf_counter() - start:.0f} s; {steps} steps of global batch {args.global_batch} per run"
        )
        runs = [run_workers(latents_dir, "mmap", w, steps, args.global_batch) for w in (1, 2)]
        runs += [run_workers(latents_dir, "copy", w, steps, args.global_batch) for w in range(1, args.copy_workers + 1)]
        print(
            f"{'loader':<6} {'workers':>7} {'load s':>7} {'batch ms':>9} {'peak PSS per worker GiB':>24} "
            f"{'node GiB':>9}"
        )
        for r in runs:
            print(
                f"{r['loader']:<6} {r['workers']:>7} {max(x['load_s'] for x in r['reports']):7.2f} "
                f"{np.mean([x['batch_ms'] for x in r['reports']]):9.2f} "
                f"{' '.join(f'{g:.2f}' for g in r['peak_worker_gib']):>24} {r['peak_node_gib']:9.2f}"
            )
        mmap1, mmap2 = runs[0], runs[1]
        print(
            f"node PSS, mmap, 2 workers / 1 worker: {mmap2['peak_node_gib'] / mmap1['peak_node_gib']:.3f} (goal <= 1.2)"
        )
        if args.copy_workers:
            copy1 = runs[2]
            same = copy1["reports"][0]["sha256"] == mmap1["reports"][0]["sha256"]
            print(
                f"node PSS, copy / mmap (1 worker): {copy1['peak_node_gib'] / mmap1['peak_node_gib']:.2f}; "
                f"same batches: {same}"
            )
            if not same:
                raise SystemExit("the two loaders gave different batches")
        both = subprocess.run(
            [
                sys.executable,
                __file__,
                "--latents",
                str(latents_dir),
                "--worker",
                "both",
                "0",
                "1",
                str(steps),
                "--global-batch",
                str(args.global_batch),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        timing = json.loads(both.stdout.strip().splitlines()[-1])
        for epoch in (1, 2):
            mmap, copy = timing[f"mmap{epoch}"], timing[f"copy{epoch}"]
            print(
                f"batch time, one process alternating loaders, pass {epoch} over {steps} steps (median): mmap "
                f"{mmap:.2f} ms, copy {copy:.2f} ms, ratio mmap / copy {mmap / copy:.3f}; same batches: "
                f"{timing['same']}"
            )
        if not timing["same"]:
            raise SystemExit("the two loaders gave different batches")
    finally:
        if not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
