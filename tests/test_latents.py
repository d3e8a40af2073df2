"""The `dit-latents` reader: memory-mapped shards hold the bytes safetensors' own reader returns, training batches
drawn from them equal those of the whole set concatenated in memory, and opening a set copies nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pipeline.train as T
from pipeline.artifacts import ArtifactError, sha256_file, write_manifest
from pipeline.formats.latents import LatentSet, load_latents, map_shard, open_latents

COUNTS = (7, 16, 1, 9)  # uneven shards: batches straddle their boundaries


def write_set(directory: Path, store: str = "posterior", dtype=torch.float16, counts=COUNTS) -> Path:
    g = torch.Generator().manual_seed(0)
    directory.mkdir(parents=True)
    entries = []
    for s, n in enumerate(counts):
        tensors = {"label": torch.randint(0, 5, (n,), generator=g)}
        keys = ("mean", "std") if store == "posterior" else ("sample",)
        tensors.update({k: torch.randn(n, 2, 4, 8, 8, generator=g).to(dtype) for k in keys})
        name = f"latents-{s:05d}.safetensors"
        save_file(tensors, directory / name)
        entries.append(
            {
                "file": name,
                "count": n,
                "size": (directory / name).stat().st_size,
                "sha256": sha256_file(directory / name),
            }
        )
    write_manifest(
        directory,
        "dit-latents",
        1,
        count=sum(counts),
        latent_shape=[4, 8, 8],
        scaling_factor=0.5,
        store=store,
        flip=True,
        num_classes=5,
        shards=entries,
    )
    return directory


def concatenated(directory: Path) -> dict[str, torch.Tensor]:
    """The set as the reader before memory-mapping held it: safetensors' loader, then torch.cat."""
    shards = [load_file(p) for p in sorted(directory.glob("latents-*.safetensors"))]
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_mapped_shard_equals_safetensors_load_file(tmp_path, dtype):
    directory = write_set(tmp_path / "latents", dtype=dtype, counts=(5,))
    mapped, loaded = (
        map_shard(directory / "latents-00000.safetensors"),
        load_file(directory / "latents-00000.safetensors"),
    )
    assert mapped.keys() == loaded.keys()
    for key in loaded:
        assert mapped[key].dtype == loaded[key].dtype and torch.equal(mapped[key], loaded[key])


@pytest.mark.parametrize("store", ["posterior", "sample"])
def test_batches_from_mapped_shards_equal_the_concatenated_set(tmp_path, store):
    directory = write_set(tmp_path / "latents", store)
    manifest, latents = open_latents(directory)
    assert len(latents.shards) == len(COUNTS) and latents.count == manifest["count"] == sum(COUNTS)
    mapped = T.LatentBatches(latents, 0.5, seed=3, device=torch.device("cpu"))
    in_memory = T.LatentBatches(concatenated(directory), 0.5, seed=3, device=torch.device("cpu"))
    for step in range(9):  # three epochs of 3 global batches of 10 (the last partial one dropped)
        for rank in range(2):
            torch.manual_seed(step * 2 + rank)
            x, y = mapped.batch(step, rank, 2, 10)
            torch.manual_seed(step * 2 + rank)
            x_ref, y_ref = in_memory.batch(step, rank, 2, 10)
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert all(torch.equal(a, b) for a, b in zip(load_latents(directory)[1].values(), concatenated(directory).values()))


def test_opening_a_set_copies_nothing_into_private_memory(tmp_path):
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs Linux /proc")

    def rss_kib(kind: str) -> int:  # RssAnon: private memory; RssFile: pages of mapped files
        return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith(kind))

    directory = write_set(tmp_path / "latents", counts=(4096, 4096))  # 2 x 4096 x 2 x 2 x 4 x 8 x 8 fp16: 16 MiB
    anon, file = rss_kib("RssAnon"), rss_kib("RssFile")
    _, latents = open_latents(directory)
    total = 0.0
    for start in range(0, latents.count, 256):  # every row, 256 at a time, as training batches read them
        rows = torch.arange(start, start + 256)
        total += sum(float(latents.take(k, rows).float().sum()) for k in latents.keys)
    assert total == total  # read, not optimised away
    assert rss_kib("RssFile") - file > 14 * 1024  # the 16 MiB were read through the mapping...
    assert rss_kib("RssAnon") - anon < 4 * 1024  # ...and not copied into this process's private memory


def test_a_truncated_shard_or_a_missing_one_is_one_clear_error(tmp_path):
    directory = write_set(tmp_path / "latents")
    shard = directory / "latents-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="bytes, its manifest says.*dvc repro encode"):
        open_latents(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["shards"][1]["size"] -= 100  # a manifest that agrees: the tensors' extents still tell
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="corrupt or misaligned.*dvc repro encode"):
        open_latents(directory)
    shard.unlink()
    with pytest.raises(ArtifactError, match="missing; run `dvc pull`"):
        open_latents(directory)


def test_shards_that_disagree_are_refused():
    a = {"label": torch.zeros(2, dtype=torch.int64), "mean": torch.zeros(2, 2, 4, 8, 8)}
    with pytest.raises(ArtifactError, match="does not match the first"):
        LatentSet([a, {**a, "mean": torch.zeros(2, 2, 4, 4, 4)}])


def test_a_shard_of_another_size_or_content_is_refused(tmp_path):
    directory = write_set(tmp_path / "latents")
    shard = directory / "latents-00001.safetensors"
    original = shard.read_bytes()
    shard.write_bytes(original + b"\0" * 64)  # grown: every extent still fits, so only the recorded size tells
    with pytest.raises(ArtifactError, match="is .* bytes, its manifest says"):
        open_latents(directory)
    with pytest.raises(ArtifactError, match="is .* bytes, its manifest says"):
        load_latents(directory)
    flipped = bytearray(original)
    flipped[-1] ^= 0xFF  # same size, one byte of a value changed: only the hash tells, in memory
    shard.write_bytes(bytes(flipped))
    open_latents(directory)  # memory-mapped: size and rows only (see its docstring)
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        load_latents(directory)
    other = write_set(tmp_path / "other", counts=(7,))  # a shard of another run, its size recorded as if it fit
    shard.write_bytes((other / "latents-00000.safetensors").read_bytes())
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["shards"][1]["size"] = shard.stat().st_size
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="holds 7 rows, its manifest says 16"):
        open_latents(directory)
