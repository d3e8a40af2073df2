"""The `vae` section: a pretrained VAE, or the small KL-VAE trained here."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.params.load import ParamsError
from pipeline.provenance import NO_INPUT, local_input


@dataclass(frozen=True)
class VAEParams:
    pretrained: str | None  # hub id; None = pretrained_dir, or the small VAE below
    pretrained_dir: str  # a local save_pretrained directory tracked with `dvc add` (a dvc.yaml dep); NO_INPUT = none
    block_out_channels: tuple[int, ...]  # len 3 = 2 downsamples = downsample 4
    latent_channels: int
    layers_per_block: int
    norm_num_groups: int  # GroupNorm groups; must divide every entry of block_out_channels
    train_steps: int
    batch_size: int
    lr: float
    kl_weight: float  # LDM's beta on the per-image KL, against the per-image summed reconstruction error
    init_logvar: float  # initial log-variance of the posterior (bias of the encoder's logvar output)
    holdout: int  # images kept out of training, for the reconstruction PSNR
    seed: int

    def __post_init__(self):
        if self.pretrained is not None and local_input(self.pretrained_dir) is not None:
            raise ParamsError(
                f"set 'vae.pretrained' (a hub id) or 'vae.pretrained_dir' (a local snapshot), not both: "
                f"got {self.pretrained!r} and {self.pretrained_dir!r}; {NO_INPUT} means no local one"
            )
        for key in ("train_steps", "batch_size", "holdout", "latent_channels", "layers_per_block"):
            if getattr(self, key) < 1:
                raise ParamsError(f"'vae.{key}' must be >= 1, got {getattr(self, key)}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ParamsError(
                f"'vae.norm_num_groups' ({self.norm_num_groups}) must divide every entry of "
                f"'vae.block_out_channels' {list(self.block_out_channels)}"
            )
