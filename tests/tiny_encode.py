"""The encode tests' settings, shared by the encode and cluster tests (their images and VAE: conftest's
`encode_inputs`)."""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import sha256_file
from pipeline.params.encode import EncodeParams

# micro_batch 4 against batch sizes 1, 3, 5, 7: every batch boundary falls somewhere else, every last chunk is padded.
PARAMS = EncodeParams(
    flip=True, store="posterior", dtype="float32", batch_size=5, micro_batch=4, num_actors=1, use_gpu=False, seed=0
)


def shard_hashes(directory: Path) -> list[str]:
    return [sha256_file(p) for p in sorted(directory.glob("latents-*.safetensors"))]
