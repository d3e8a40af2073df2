"""The `sample` section: the sampler, guidance and the shards of the FID sample set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.params.load import ParamsError
from pipeline.params.rules import AttentionBackend, Precision, check_attention, check_precision, check_storage_path


@dataclass(frozen=True)
class SampleParams:
    num_fid_samples: int  # paper: 50,000
    sampler: Literal["ddpm", "ddim", "dpm-solver++"]
    steps: int
    cfg_scale: float  # 1.0 = no guidance
    cfg_channels: int | None  # None = guide all eps channels; 3 = the official sampler
    labels: Literal["balanced", "uniform"]
    batch_size: int  # images per sampler loop, rounded up to whole micro-batches; does not change pixels
    micro_batch: int  # images per network/VAE call (2x rows with guidance); fixes the pixels, see the docstring
    precision: Precision  # fp32 | tf32 (the official sampler) | bf16 autocast of the DiT; the VAE decodes in float32
    compile: bool  # torch.compile the DiT's forward (one shape per run, thanks to the fixed micro-batch)
    num_workers: int  # 0 = in-process; >= 1: Ray actors, that many on CPU, or one per GPU of the cluster with use_gpu
    use_gpu: bool
    shard_size: int  # images per resumable shard
    seed: int
    grid_per_class: int
    attention: AttentionBackend = "auto"  # the SDPA kernel (pipeline/attention.py); params.yaml always names it
    # Where the DiT weights and the VAE reach the actors' nodes (pipeline/shared_storage.py): s3://... or a directory
    # every node mounts; "" = the driver's paths. Never the pixels.
    storage_path: str = ""

    def __post_init__(self):
        check_params(self)


def check_params(p: SampleParams) -> None:
    for name in ("num_fid_samples", "steps", "batch_size", "micro_batch", "shard_size", "grid_per_class"):
        if getattr(p, name) < 1:
            raise ParamsError(f"'sample.{name}' must be >= 1, got {getattr(p, name)}")
    if p.num_workers < 0:
        raise ParamsError(f"'sample.num_workers' must be >= 0 (0 = in-process), got {p.num_workers}")
    if p.storage_path and p.num_workers == 0:  # in-process sampling reads the driver's files: nothing to publish
        raise ParamsError(
            "'sample.storage_path' reaches the sampling actors' nodes: it needs sample.num_workers >= 1 "
            '(or set it to "" to sample in-process)'
        )
    check_storage_path("sample.storage_path", p.storage_path)
    if p.shard_size % p.micro_batch:
        raise ParamsError(
            f"'sample.shard_size'={p.shard_size} must be a multiple of sample.micro_batch="
            f"{p.micro_batch} (the fixed network batch) so that shards do not split a block"
        )
    check_precision("sample", p.precision, p.use_gpu)
    check_attention("sample", p.attention, p.use_gpu)
