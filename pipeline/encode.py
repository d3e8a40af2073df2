"""The `encode` stage: every image (and its horizontal flip) through the VAE encoder, once, with Ray Data.

DiT trains on latents of a frozen VAE (DiT Sec. 3.1); encoding them once up front, instead of every step, is what the
official fast-DiT port does too. Ray Data streams the image shards through a pool of encoder actors (one per GPU, or
CPU actors); the driver places the rows by their global index and writes `latents-XXXXX.safetensors`, same row split
as the image shards, each as soon as it is complete, so memory stays bounded by the shards in flight. The bytes do
not depend on the number of actors, on `batch_size` or on arrival order: rows are placed by index, every VAE forward
has one fixed shape and layout, and CPU encoders run with a fixed thread count (see `LatentEncoder`).
Latents are stored unscaled; the scaling factor is recorded in the manifest, copied from the VAE config.

Resume. Each finished shard is written atomically to `<shards>/<key>/` (`data/latents-shards`, a persisted DVC
output), where key hashes what determines its bytes: the images, the VAE, the params that change numbers and the
code and package stamp. A killed run skips the shards found there; the output links (or copies) them, so it has
the bytes of an uninterrupted run. Shards of another key are moved aside to `data/superseded/`, never deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tqdm import tqdm

from pipeline.artifacts import ArtifactError, atomic_write_json, sha256_dir, sha256_file, staged_dir
from pipeline.autoencoder import encode_images, load_vae
from pipeline.cluster import init_ray
from pipeline.code_stamp import stamp
from pipeline.determinism import torch_threads
from pipeline.formats import images as image_shards
from pipeline.formats.latents import map_shard, shard_name, write_latents_manifest, write_shard
from pipeline.params.encode import EncodeParams
from pipeline.params.load import ParamsError
from pipeline.persisted import open_keyed_dir, superseded_root
from pipeline.shared_storage import on_this_node, publish
from pipeline.timing import mark_ready

# CPUs reserved per encoder actor, and torch's intra-op threads whenever the VAE runs on a CPU. Pinned because the
# conv kernels split work by thread count and round differently (measured: 1 vs 2 threads changes the last bits), so
# latents would depend on the machine's core count. More CPU throughput comes from more actors (encode.num_actors).
CPU_THREADS = 1


def decode_rows(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """{image: PNG bytes (n,), path, key, ...} -> {image: uint8 (n, S, S, 3), ...}; the other columns pass through."""
    wheres = (f"{path} key {key}" for path, key in zip(batch["path"], batch["key"]))
    return {**batch, "image": image_shards.decode_pngs(batch["image"], image_size, wheres)}


class LatentEncoder:
    """Batch of decoded rows {image: uint8 (n, H, W, 3), label (n,), ...} -> the same rows, the image replaced by
    the posterior `mean` and `std`, float32 (n, F, C, h, w). A callable class, so Ray's actors load the VAE once."""

    def __init__(self, vae_dir: str, flip: bool, micro_batch: int, device: str):
        self.vae = load_vae(on_this_node(vae_dir), device)  # a driver path, or the node's copy from storage
        self.flip = flip
        self.micro_batch = micro_batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mark_ready()
        # Ray Data hands over read-only views of its Arrow blocks; torch has no read-only tensors and warns that
        # writing would be undefined. Nothing here writes, but no zero-copy route says so to torch (from_dlpack
        # takes read-only arrays only from recent numpy; pyproject allows 1.26): copy the uint8 batch when it is
        # read-only, a quarter of the size of the float32 copy that to_pixels makes anyway.
        image = np.require(batch["image"], requirements="W")
        x = torch.from_numpy(image).permute(0, 3, 1, 2)  # (n, 3, H, W) uint8
        views = [x, x.flip(-1)] if self.flip else [x]  # index 0 = original, 1 = horizontally flipped
        with torch_threads(CPU_THREADS) if self.vae.device.type == "cpu" else nullcontext():
            mean, std = zip(*(self.encode_fixed_shape(v) for v in views))
        rest = {k: v for k, v in batch.items() if k != "image"}
        return {**rest, "mean": torch.stack(mean, 1).numpy(), "std": torch.stack(std, 1).numpy()}

    def encode_fixed_shape(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode (n, 3, H, W) in chunks of exactly `micro_batch` images, zero-padding the last one.

        oneDNN and cuDNN choose conv kernels by input shape, and different kernels round differently (measured: the
        same image encoded in a batch of 1, 7 or 16 differs in the last bits). With one shape for every forward, an
        image's latent depends on the image alone, not on how Ray happened to cut the rows into batches."""
        means, stds = [], []
        for i in range(0, len(x), self.micro_batch):
            chunk = x[i : i + self.micro_batch]
            pad = self.micro_batch - len(chunk)
            if pad:
                chunk = torch.cat([chunk, chunk.new_zeros((pad, *chunk.shape[1:]))])
            mean, std = encode_images(self.vae, chunk)
            means.append(mean[: self.micro_batch - pad].cpu())
            stds.append(std[: self.micro_batch - pad].cpu())
        return torch.cat(means), torch.cat(stds)


def posterior_sample(mean: np.ndarray, std: np.ndarray, indices: np.ndarray, seed: int) -> np.ndarray:
    """One fixed draw z = mean + std * eps per image; image i's eps comes from (seed, i) alone."""
    eps = np.stack(
        [
            np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, int(i)]))).standard_normal(
                mean.shape[1:], dtype=np.float32
            )
            for i in indices
        ]
    )
    return mean + std * eps


class ShardWriter:
    """Places encoded rows by their global index and writes each latents shard to `out_dir` (the persisted shard
    directory) as soon as all its rows are in, so the bytes do not depend on the order in which the rows arrive.
    Memory: the shards in flight. Shards already in `out_dir`, from a killed run, count as written (`todo`)."""

    def __init__(self, out_dir: Path, images_manifest: dict, params: EncodeParams):
        self.out_dir, self.params = out_dir, params
        self.shards = images_manifest["shards"]
        self.starts = np.cumsum([0] + [s["count"] for s in self.shards])  # (S + 1,) first global index per shard
        self.pending: dict[int, dict[str, np.ndarray]] = {}  # shard number -> stored tensors being filled
        self.seen: dict[int, np.ndarray] = {}  # shard number -> bool (count,)
        self.written: dict[int, dict] = {}
        self.latent_shape: list[int] = []  # [C, h, w]

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """`batch`: {index (n,) global row indices, label (n,), mean, std (n, F, C, h, w)}, any rows in any order."""
        index = np.asarray(batch["index"], dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= self.starts[-1]):
            raise ArtifactError(
                f"row index outside the {self.starts[-1]} images of the manifest; run `dvc repro ingest`"
            )
        stored = self.to_stored(batch, index)
        shard_of = np.searchsorted(self.starts, index, side="right") - 1
        for s in np.unique(shard_of).tolist():
            rows, local = shard_of == s, index[shard_of == s] - self.starts[s]
            if s not in self.pending:
                count = self.shards[s]["count"]
                self.pending[s] = {k: np.empty((count, *v.shape[1:]), v.dtype) for k, v in stored.items()}
                self.seen[s] = np.zeros(count, bool)
            if s in self.written or self.seen[s][local].any():
                raise RuntimeError(f"rows of {self.shards[s]['file']} were encoded twice")
            for key, values in stored.items():
                self.pending[s][key][local] = values[rows]
            self.seen[s][local] = True
            if self.seen[s].all():
                self.flush(s)

    def todo(self) -> list[int]:
        """Take the shards a killed run finished (written atomically, so a file there is whole) as written; the
        numbers of the shards left to encode."""
        for s, shard in enumerate(self.shards):
            path = self.out_dir / shard_name(shard["file"])
            if s not in self.written and path.is_file():
                self.written[s] = {
                    "file": path.name,
                    "count": shard["count"],
                    "size": path.stat().st_size,
                    "sha256": sha256_file(path),
                }
                stored = map_shard(path)
                self.latent_shape = list(stored["mean" if "mean" in stored else "sample"].shape[2:])
        return [s for s in range(len(self.shards)) if s not in self.written]

    def to_stored(self, batch: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
        dtype = np.dtype(self.params.dtype)
        self.latent_shape = list(batch["mean"].shape[2:])
        out = {"label": np.asarray(batch["label"], dtype=np.int64)}
        if self.params.store == "posterior":
            out.update(mean=batch["mean"].astype(dtype), std=batch["std"].astype(dtype))
        else:
            out["sample"] = posterior_sample(batch["mean"], batch["std"], index, self.params.seed).astype(dtype)
        return out

    def flush(self, s: int) -> None:
        arrays = self.pending.pop(s)  # C-contiguous (np.empty)
        del self.seen[s]
        self.written[s] = write_shard(self.out_dir, shard_name(self.shards[s]["file"]), arrays)

    def finish(self) -> list[dict]:
        missing = [self.shards[s]["file"] for s in range(len(self.shards)) if s not in self.written]
        if missing:
            raise RuntimeError(f"encoding ended with {len(missing)} incomplete shards, first {missing[0]}")
        return [self.written[s] for s in range(len(self.shards))]


def shards_key(images_dir: str | Path, vae_dir: str | Path, params: EncodeParams) -> str:
    """Hash of what determines the latents' bytes: the images, the VAE, the params that change numbers (not
    batch_size, num_actors or storage_path), and the code and packages that run (`provenance.stamp`)."""
    determining = {
        "images_manifest_sha256": sha256_file(Path(images_dir) / "manifest.json"),
        "vae_sha256": sha256_dir(vae_dir),
        "flip": params.flip,
        "store": params.store,
        "dtype": params.dtype,
        "micro_batch": params.micro_batch,
        "seed": params.seed,
        "use_gpu": params.use_gpu,  # GPU kernels round otherwise
        "stamp": stamp("encode"),
    }
    return hashlib.sha256(json.dumps(determining, sort_keys=True).encode()).hexdigest()[:16]


def open_writer(
    images_dir: str | Path,
    vae_dir: str | Path,
    out_dir: str | Path,
    params: EncodeParams,
    shards_dir: str | Path | None,
) -> ShardWriter:
    """The writer into the persisted shards of this setting (`shards_dir`, default `<out_dir>-shards`), with the
    shards of other settings moved aside after checking the disk holds as many again."""
    shards_dir = Path(shards_dir) if shards_dir else Path(f"{out_dir}-shards")
    key_dir = open_keyed_dir(
        shards_dir,
        shards_key(images_dir, vae_dir, params),
        superseded_root(shards_dir),
        "encode",
        need_bytes=lambda moved_bytes: moved_bytes,
    )
    return ShardWriter(key_dir, image_shards.read_manifest(images_dir), params)


def write_latents(
    batches: Iterable[dict[str, np.ndarray]],
    writer: ShardWriter,
    images_dir: str | Path,
    vae_dir: str | Path,
    out_dir: str | Path,
    params: EncodeParams,
) -> dict:
    """Drain encoded `batches` (rows with their global `index`) into the writer's shards, then write `out_dir`:
    every shard, linked (or copied) from the persisted ones, and the manifest."""
    images = image_shards.read_manifest(images_dir)
    done = sum(writer.shards[s]["count"] for s in writer.written)
    with tqdm(total=images["count"], initial=done, desc="encode", unit="img") as bar:
        for batch in batches:
            writer.add(batch)
            bar.update(len(batch["index"]))
    shards = writer.finish()
    with staged_dir(out_dir) as tmp:
        for shard in shards:
            link_or_copy(writer.out_dir / shard["file"], tmp / shard["file"])
        manifest = dict(
            count=images["count"],
            latent_shape=writer.latent_shape,
            dtype=params.dtype,
            flip=params.flip,
            store=params.store,
            scaling_factor=load_vae(vae_dir).config.scaling_factor,
            vae_sha256=sha256_dir(vae_dir),
            images_manifest_sha256=sha256_file(Path(images_dir) / "manifest.json"),
            num_classes=images["num_classes"],
            class_names=images["class_names"],
            image_size=images["image_size"],
            shards=shards,
        )
        write_latents_manifest(tmp, **manifest)
    return manifest


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no second copy of ImageNet's latents), or a copy where the file system has none."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def encode_local(
    params: EncodeParams,
    images_dir: str | Path,
    vae_dir: str | Path,
    out_dir: str | Path,
    device: str = "cpu",
    *,
    shards_dir: str | Path | None = None,
) -> dict:
    """The same encoding in this process, without Ray: the reference the Ray path must match bit for bit."""
    writer = open_writer(images_dir, vae_dir, out_dir, params, shards_dir)
    todo = writer.todo()
    encoder = LatentEncoder(str(vae_dir), params.flip, params.micro_batch, device) if todo else None
    images = image_shards.read_manifest(images_dir)

    def batches():
        for s in todo:
            pixels, labels = image_shards.read_shard(images_dir, images["shards"][s], images["image_size"])
            start = writer.starts[s]  # global index of the shard's first row
            for i in range(0, len(pixels), params.batch_size):
                j = min(i + params.batch_size, len(pixels))
                yield encoder({"image": pixels[i:j], "label": labels[i:j], "index": np.arange(start + i, start + j)})

    return write_latents(batches(), writer, images_dir, vae_dir, out_dir, params)


def row_index(images_dir: str | Path, images_manifest: dict, todo: list[int]) -> dict[tuple[str, str], int]:
    """(shard file, key) -> global row index, for the shards numbered `todo`. Ray Data reads files in no guaranteed
    order (it lists them in parallel and bin-packs them into read tasks), so rows find their place by key, which is
    unique within a shard."""
    lookup, start = {}, 0
    for s, shard in enumerate(images_manifest["shards"]):
        if s not in todo:
            start += shard["count"]
            continue
        keys = image_shards.read_keys(images_dir, shard)
        if len(set(keys)) != len(keys):
            raise ArtifactError(
                f"{images_dir}/{shard['file']} repeats keys; keys must be unique, run `dvc repro ingest`"
            )
        lookup.update({(shard["file"], key): start + i for i, key in enumerate(keys)})
        start += len(keys)
    return lookup


def encode_ray(
    params: EncodeParams,
    images_dir: str | Path,
    vae_dir: str | Path,
    out_dir: str | Path,
    shards_dir: str | Path | None = None,
) -> tuple[dict, int]:
    """The manifest, and the number of images this run encoded: the shards left to encode (`shards_dir`: see
    `open_writer`), with Ray Data: read_parquet -> PNG decoding in tasks -> a fixed pool of `num_actors`
    LatentEncoder actors (one GPU each, or CPU) -> rows streamed back to the driver, which places them by index and
    writes the shards."""
    import ray  # here, not at the top: importing this module needs no Ray
    from ray.util.annotations import RayDeprecationWarning

    images = image_shards.read_manifest(images_dir)
    writer = open_writer(images_dir, vae_dir, out_dir, params, shards_dir)
    todo = writer.todo()
    if not todo:  # a killed run finished every shard: nothing for Ray to do
        return write_latents([], writer, images_dir, vae_dir, out_dir, params), 0
    lookup = row_index(images_dir, images, todo)
    init_ray()
    check_resources(params)
    # Without storage, the read tasks and the encoders read the driver's paths; with it, every node reads the
    # image shards from storage and copies the VAE once.
    images_at, vae_at = Path(images_dir).resolve(), str(Path(vae_dir).resolve())
    if params.storage_path:
        images_at = publish(images_dir, params.storage_path, "images")
        vae_at = publish(vae_dir, params.storage_path, "vae")
    paths = [f"{images_at}/{images['shards'][s]['file']}" for s in todo]
    ds = ray.data.read_parquet(paths, include_paths=True)
    ds = ds.select_columns(["image", "label", "key", "path"])
    # Parquet reads bin-pack small shards into ~128 MiB read tasks; cut them (streaming) into blocks of batch_size
    # rows, so that every actor gets work, not just the one that receives the single block.
    ds = ds.repartition(target_num_rows_per_block=params.batch_size)
    ds = ds.map_batches(
        decode_rows, fn_kwargs={"image_size": images["image_size"]}, batch_size=params.batch_size, batch_format="numpy"
    )
    # Ray Data restarts pool actors forever by default, and passes them its own plan through the object store, so
    # Ray core logs an error for each actor that "the actor restart will fail" (ray-project/ray#57733, #53727). A
    # dead encoder means a bug or out-of-memory, which a restart repeats: fail, `dvc repro` reruns. Ray 2.60
    # deprecates remote args passed as keywords (removed in 2.64) but names no `max_restarts` among the parameters
    # that replace them (label_selector, max_calls, resources, accelerator_type, runtime_env, ...), so its warning
    # is silenced for this call alone; once the keyword is gone, map_batches rejects it and this line must change.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", RayDeprecationWarning)
        ds = ds.map_batches(
            LatentEncoder,
            fn_constructor_kwargs=dict(
                vae_dir=vae_at,
                flip=params.flip,
                micro_batch=params.micro_batch,
                device="cuda" if params.use_gpu else "cpu",
            ),
            compute=ray.data.ActorPoolStrategy(size=params.num_actors),
            batch_size=params.batch_size,
            batch_format="numpy",
            num_gpus=1 if params.use_gpu else 0,
            num_cpus=CPU_THREADS,
            max_restarts=0,
        )

    def indexed(batches):
        for batch in batches:
            yield {**batch, "index": np.array([lookup[Path(p).name, k] for p, k in zip(batch["path"], batch["key"])])}

    manifest = write_latents(
        indexed(ds.iter_batches(batch_size=None, batch_format="numpy")), writer, images_dir, vae_dir, out_dir, params
    )
    return manifest, sum(images["shards"][s]["count"] for s in todo)


def check_resources(params: EncodeParams) -> None:
    """Fail now rather than hang: a fixed actor pool that takes every CPU leaves none for reading and decoding."""
    import ray

    have = ray.cluster_resources()
    need_cpus = params.num_actors * CPU_THREADS + 1
    if have.get("CPU", 0) < need_cpus:
        raise ParamsError(
            f"encode.num_actors={params.num_actors} needs {need_cpus} CPUs in the Ray cluster "
            f"({CPU_THREADS} per actor + 1 for reading and PNG decoding), it has {have.get('CPU', 0)}; "
            "lower encode.num_actors or join a larger cluster with RAY_ADDRESS"
        )
    if params.use_gpu and have.get("GPU", 0) < params.num_actors:
        raise ParamsError(
            f"encode.use_gpu with num_actors={params.num_actors} needs one GPU per actor, the Ray "
            f"cluster has {have.get('GPU', 0)}; lower encode.num_actors or set encode.use_gpu: false"
        )


def run_encode(
    params: EncodeParams,
    images_dir: str | Path,
    vae_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path,
    shards_dir: str | Path | None = None,
) -> dict:
    """The stage: encode with Ray (resuming the persisted shards of `shards_dir`), print the throughput, write
    `metrics_path` (seconds, img/s); returns them with the count and the number of actors. img/s counts the images
    encoded by this run, and is absent when a killed run had encoded them all."""
    start = time.perf_counter()
    manifest, encoded = encode_ray(params, images_dir, vae_dir, out_dir, shards_dir)
    seconds = time.perf_counter() - start
    metrics = {
        "count": manifest["count"],
        "encoded": encoded,
        "seconds": round(seconds, 2),
        "num_actors": params.num_actors,
    }
    if encoded:
        metrics["img_per_s"] = round(encoded / seconds, 1)
    print(
        f"encoded {encoded} of {metrics['count']} images in {metrics['seconds']} s "
        f"({metrics.get('img_per_s', 0)} img/s) with {params.num_actors} {'GPU' if params.use_gpu else 'CPU'} "
        "actor(s)"
    )
    atomic_write_json(metrics_path, {k: metrics[k] for k in ("seconds", "img_per_s") if k in metrics})
    return metrics
