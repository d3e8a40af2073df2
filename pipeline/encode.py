"""The `encode` stage: every image (and its horizontal flip) through the VAE encoder, once, with Ray Data.

DiT trains on latents of a frozen VAE (DiT Sec. 3.1); encoding them once up front, instead of every step, is what the
official fast-DiT port does too. Ray Data streams the image shards through a pool of encoder actors (one per GPU, or
CPU actors); the driver places the rows by their global index and writes `latents-XXXXX.safetensors`, same row split
as the image shards, each as soon as it is complete, so memory stays bounded by the shards in flight. The bytes do
not depend on the number of actors, on `batch_size` or on arrival order: rows are placed by index, every VAE forward
has one fixed shape and layout, and CPU encoders run with a fixed thread count (see `LatentEncoder`).
Latents are stored unscaled; the scaling factor is recorded in the manifest, copied from the VAE config.
"""
from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tqdm import tqdm

from pipeline.artifacts import ArtifactError, atomic_write_json, sha256_dir, sha256_file, staged_dir
from pipeline.cluster import init_ray
from pipeline.params.load import ParamsError
from pipeline.determinism import torch_threads
from pipeline.formats import images as image_shards
from pipeline.formats.latents import shard_name, write_latents_manifest, write_shard
from pipeline.timing import mark_ready
from pipeline.shared_storage import on_this_node, publish
from pipeline.autoencoder import encode_images, load_vae
from pipeline.params.encode import EncodeParams

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
            chunk = x[i:i + self.micro_batch]
            pad = self.micro_batch - len(chunk)
            if pad:
                chunk = torch.cat([chunk, chunk.new_zeros((pad, *chunk.shape[1:]))])
            mean, std = encode_images(self.vae, chunk)
            means.append(mean[: self.micro_batch - pad].cpu())
            stds.append(std[: self.micro_batch - pad].cpu())
        return torch.cat(means), torch.cat(stds)


def posterior_sample(mean: np.ndarray, std: np.ndarray, indices: np.ndarray, seed: int) -> np.ndarray:
    """One fixed draw z = mean + std * eps per image; image i's eps comes from (seed, i) alone."""
    eps = np.stack([
        np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, int(i)])))
        .standard_normal(mean.shape[1:], dtype=np.float32)
        for i in indices
    ])
    return mean + std * eps


class ShardWriter:
    """Places encoded rows by their global index and writes each latents shard as soon as all its rows are in, so
    the bytes do not depend on the order in which the rows arrive. Memory: the shards in flight."""

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
            raise ArtifactError(f"row index outside the {self.starts[-1]} images of the manifest; "
                                "run `dvc repro ingest`")
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


def write_latents(batches: Iterable[dict[str, np.ndarray]], images_dir: str | Path, vae_dir: str | Path,
                  out_dir: str | Path, params: EncodeParams) -> dict:
    """Drain encoded `batches` (rows with their global `index`) into `out_dir`'s shards and manifest."""
    images = image_shards.read_manifest(images_dir)
    with staged_dir(out_dir) as tmp:
        writer = ShardWriter(tmp, images, params)
        with tqdm(total=images["count"], desc="encode", unit="img") as bar:
            for batch in batches:
                writer.add(batch)
                bar.update(len(batch["index"]))
        manifest = dict(
            count=images["count"], latent_shape=writer.latent_shape, dtype=params.dtype, flip=params.flip,
            store=params.store, scaling_factor=load_vae(vae_dir).config.scaling_factor,
            vae_sha256=sha256_dir(vae_dir), images_manifest_sha256=sha256_file(Path(images_dir) / "manifest.json"),
            num_classes=images["num_classes"], class_names=images["class_names"], image_size=images["image_size"],
            shards=writer.finish(),
        )
        write_latents_manifest(tmp, **manifest)
    return manifest


def encode_local(params: EncodeParams, images_dir: str | Path, vae_dir: str | Path, out_dir: str | Path,
                 device: str = "cpu") -> dict:
    """The same encoding in this process, without Ray: the reference the Ray path must match bit for bit."""
    encoder = LatentEncoder(str(vae_dir), params.flip, params.micro_batch, device)

    def batches():
        start = 0  # global index of the shard's first row
        for images, labels in image_shards.iter_image_shards(images_dir):
            for i in range(0, len(images), params.batch_size):
                j = min(i + params.batch_size, len(images))
                yield encoder({"image": images[i:j], "label": labels[i:j], "index": np.arange(start + i, start + j)})
            start += len(images)

    return write_latents(batches(), images_dir, vae_dir, out_dir, params)


def row_index(images_dir: str | Path, images_manifest: dict) -> dict[tuple[str, str], int]:
    """(shard file, key) -> global row index. Ray Data reads files in no guaranteed order (it lists them in
    parallel and bin-packs them into read tasks), so rows find their place by key, which is unique within a shard."""
    lookup, start = {}, 0
    for shard in images_manifest["shards"]:
        keys = image_shards.read_keys(images_dir, shard)
        if len(set(keys)) != len(keys):
            raise ArtifactError(f"{images_dir}/{shard['file']} repeats keys; keys must be unique, "
                                "run `dvc repro ingest`")
        lookup.update({(shard["file"], key): start + i for i, key in enumerate(keys)})
        start += len(keys)
    return lookup


def encode_ray(params: EncodeParams, images_dir: str | Path, vae_dir: str | Path, out_dir: str | Path) -> dict:
    """Ray Data: read_parquet -> PNG decoding in tasks -> a fixed pool of `num_actors` LatentEncoder actors (one GPU
    each, or CPU) -> rows streamed back to the driver, which places them by index and writes the shards."""
    import ray  # here, not at the top: importing this module needs no Ray
    from ray.util.annotations import RayDeprecationWarning

    images = image_shards.read_manifest(images_dir)
    lookup = row_index(images_dir, images)
    init_ray()
    check_resources(params)
    # Without storage, the read tasks and the encoders read the driver's paths; with it, every node reads the
    # image shards from storage and copies the VAE once.
    images_at, vae_at = Path(images_dir).resolve(), str(Path(vae_dir).resolve())
    if params.storage_path:
        images_at = publish(images_dir, params.storage_path, "images")
        vae_at = publish(vae_dir, params.storage_path, "vae")
    paths = [f"{images_at}/{shard['file']}" for shard in images["shards"]]
    ds = ray.data.read_parquet(paths, include_paths=True)
    ds = ds.select_columns(["image", "label", "key", "path"])
    # Parquet reads bin-pack small shards into ~128 MiB read tasks; cut them (streaming) into blocks of batch_size
    # rows, so that every actor gets work, not just the one that receives the single block.
    ds = ds.repartition(target_num_rows_per_block=params.batch_size)
    ds = ds.map_batches(decode_rows, fn_kwargs={"image_size": images["image_size"]}, batch_size=params.batch_size,
                        batch_format="numpy")
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
            fn_constructor_kwargs=dict(vae_dir=vae_at, flip=params.flip,
                                       micro_batch=params.micro_batch, device="cuda" if params.use_gpu else "cpu"),
            compute=ray.data.ActorPoolStrategy(size=params.num_actors),
            batch_size=params.batch_size, batch_format="numpy",
            num_gpus=1 if params.use_gpu else 0, num_cpus=CPU_THREADS,
            max_restarts=0,
        )

    def indexed(batches):
        for batch in batches:
            yield {**batch, "index": np.array([lookup[Path(p).name, k] for p, k in zip(batch["path"], batch["key"])])}

    return write_latents(indexed(ds.iter_batches(batch_size=None, batch_format="numpy")), images_dir, vae_dir,
                         out_dir, params)


def check_resources(params: EncodeParams) -> None:
    """Fail now rather than hang: a fixed actor pool that takes every CPU leaves none for reading and decoding."""
    import ray

    have = ray.cluster_resources()
    need_cpus = params.num_actors * CPU_THREADS + 1
    if have.get("CPU", 0) < need_cpus:
        raise ParamsError(f"encode.num_actors={params.num_actors} needs {need_cpus} CPUs in the Ray cluster "
                           f"({CPU_THREADS} per actor + 1 for reading and PNG decoding), it has {have.get('CPU', 0)}; "
                           "lower encode.num_actors or join a larger cluster with RAY_ADDRESS")
    if params.use_gpu and have.get("GPU", 0) < params.num_actors:
        raise ParamsError(f"encode.use_gpu with num_actors={params.num_actors} needs one GPU per actor, the Ray "
                           f"cluster has {have.get('GPU', 0)}; lower encode.num_actors or set encode.use_gpu: false")


def run_encode(params: EncodeParams, images_dir: str | Path, vae_dir: str | Path, out_dir: str | Path,
               metrics_path: str | Path) -> dict:
    """The stage: encode with Ray, print the throughput, write `metrics_path` (seconds, img/s); returns them with
    the count and the number of actors."""
    start = time.perf_counter()
    manifest = encode_ray(params, images_dir, vae_dir, out_dir)
    seconds = time.perf_counter() - start
    metrics = {"count": manifest["count"], "seconds": round(seconds, 2),
               "img_per_s": round(manifest["count"] / seconds, 1), "num_actors": params.num_actors}
    print(f"encoded {metrics['count']} images in {metrics['seconds']} s: {metrics['img_per_s']} img/s "
          f"with {params.num_actors} {'GPU' if params.use_gpu else 'CPU'} actor(s)")
    atomic_write_json(metrics_path, {k: metrics[k] for k in ("seconds", "img_per_s")})
    return metrics
