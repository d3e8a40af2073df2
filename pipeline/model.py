"""The DiT network of Peebles & Xie (2023), "Scalable Diffusion Models with Transformers".

`DiT(x_t, t, y)` maps noisy latents x_t (N, C, H, W), timesteps t (N,) in [0, 999] and class labels y (N,) to
(N, 2C, H, W) when sigma is learned: channels [0, C) are eps, channels [C, 2C) the "learned range" log-variance
interpolation of Improved DDPM. The network knows nothing of the noise schedule; that is diffusion.py's job.

With the default adaLN-Zero conditioning the parameter names and shapes are those of the official implementation,
so the official checkpoints (e.g. DiT-XL-2-256x256.pt) load with strict=True. The other three conditioning
strategies of the paper's Fig. 3 (adaLN, cross-attention, in-context) are separate block classes, for Fig. 5.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CONDITIONINGS = ("adaLN-Zero", "adaLN", "cross-attention", "in-context")
FREQUENCY_EMBEDDING_SIZE = 256  # sinusoidal timestep features fed to the timestep MLP (official value)
MAX_PERIOD = 10_000  # longest wavelength of the sin-cos timestep and position features (Vaswani et al.)
LN_EPS = 1e-6


def modulate(x, shift, scale):
    """Adaptive LayerNorm: x (N, T, D) already normalised, shift and scale (N, D) regressed from the condition."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def layer_norm(hidden_size, affine):
    return nn.LayerNorm(hidden_size, elementwise_affine=affine, eps=LN_EPS)


def sincos_1d(dim, pos):
    """(M,) float64 positions -> (M, dim) features [sin, cos]."""
    omega = 1.0 / MAX_PERIOD ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim, grid_size):
    """Fixed 2-D position table (grid_size**2, dim), tokens in row-major order, as in MAE and the official DiT:
    the first dim/2 features encode the column, the last dim/2 the row. Computed in float64, returned in float32."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, col.flatten()), sincos_1d(dim // 2, row.flatten())], dim=1).float()


# ------------------------------ Embedders: patches, timesteps and labels


class PatchEmbed(nn.Module):
    """Patchify (paper Fig. 4): (N, C, H, W) -> (N, T, D) with T = (H/p)(W/p) tokens in row-major order."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """t (N,) -> (N, D): sinusoidal features [cos, sin], then Linear-SiLU-Linear."""

    def __init__(self, hidden_size):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(FREQUENCY_EMBEDDING_SIZE, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def timestep_embedding(t, dim=FREQUENCY_EMBEDDING_SIZE):
        # Always fp32: in bf16, t ~ 999 times a frequency near 1 would keep no phase precision at all.
        half = dim // 2
        freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]  # (N, half)
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """y (N,) -> (N, D). In training, labels are dropped with probability p (replaced by the null label
    `num_classes`, the table's last row) so that one network learns both p(x|y) and p(x) for guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, y, force_drop_ids=None):
        if force_drop_ids is None:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, y)

    def forward(self, y, force_drop_ids=None):
        if force_drop_ids is not None and self.dropout_prob == 0:
            raise ValueError("force_drop_ids needs a null label: build the model with class_dropout_prob > 0")
        if (self.training and self.dropout_prob > 0) or force_drop_ids is not None:
            y = self.token_drop(y, force_drop_ids)
        return self.embedding_table(y)


# ------------------------------ Attention, MLP and the blocks


class Attention(nn.Module):
    """Multi-head self-attention; the fused qkv projection's rows are ordered q, k, v."""

    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x):  # (N, T, D)
        N, T, D = x.shape
        # Unbinding the qkv axis in place (not moved to the front) lets the backward write the three gradients
        # straight into one (N, T, 3, H, D/H) buffer.
        q, k, v = self.qkv(x).view(N, T, 3, self.num_heads, D // self.num_heads).unbind(2)  # 3 x (N, T, H, D/H)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class CrossAttention(nn.Module):
    """Multi-head attention from the image tokens x (N, T, D) to the condition tokens c (N, S, D)."""

    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, c):
        (N, T, D), S, H = x.shape, c.shape[1], self.num_heads
        q = self.q(x).view(N, T, H, D // H).transpose(1, 2)  # (N, H, T, D/H)
        k, v = self.kv(c).view(N, S, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (N, H, S, D/H)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    def __init__(self, hidden_size, mlp_hidden_size):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden_size)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden_size, hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block (Fig. 3): LayerNorm shift/scale (beta, gamma) and residual gates (alpha), all regressed from
    c = t_emb + y_emb. The regression is zero-initialised, so every block starts as the identity."""

    def __init__(self, hidden_size, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = layer_norm(hidden_size, affine=False)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = layer_norm(hidden_size, affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):  # x (N, T, D), c (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class AdaLNBlock(nn.Module):
    """adaLN block (Fig. 3): LayerNorm shift/scale regressed from c = t_emb + y_emb, plain residuals (no alpha),
    with the regression initialised like any other linear layer."""

    def __init__(self, hidden_size, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = layer_norm(hidden_size, affine=False)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = layer_norm(hidden_size, affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 4 * hidden_size))

    def forward(self, x, c):  # x (N, T, D), c (N, D)
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class CrossAttentionBlock(nn.Module):
    """Cross-attention block (Fig. 3): a pre-LN ViT block with a multi-head cross-attention layer after
    self-attention, attending to the length-2 sequence c = [t_emb, y_emb]."""

    def __init__(self, hidden_size, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = layer_norm(hidden_size, affine=True)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = layer_norm(hidden_size, affine=True)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm3 = layer_norm(hidden_size, affine=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x, c):  # x (N, T, D), c (N, 2, D)
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), c)
        x = x + self.mlp(self.norm3(x))
        return x


class InContextBlock(nn.Module):
    """In-context block (Fig. 3): a standard pre-LN ViT block; t_emb and y_emb are two extra tokens of x."""

    def __init__(self, hidden_size, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = layer_norm(hidden_size, affine=True)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = layer_norm(hidden_size, affine=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x, c):  # x (N, T + 2, D); c is None, the condition is already in the sequence
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class FinalLayer(nn.Module):
    """adaLN final layer: norm, shift/scale regressed from c (N, D), linear to p*p*C_out per token."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = layer_norm(hidden_size, affine=False)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PlainFinalLayer(nn.Module):
    """Final layer of the cross-attention and in-context models: a plain LayerNorm, so that the condition enters
    only through the mechanism under study."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = layer_norm(hidden_size, affine=True)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x, c):
        return self.linear(self.norm_final(x))


BLOCKS = {
    "adaLN-Zero": (DiTBlock, FinalLayer),
    "adaLN": (AdaLNBlock, FinalLayer),
    "cross-attention": (CrossAttentionBlock, PlainFinalLayer),
    "in-context": (InContextBlock, PlainFinalLayer),
}


# ------------------------------ The DiT


class DiT(nn.Module):
    """Diffusion transformer f(x_t, t, y). Keyword names follow the official constructor."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        conditioning="adaLN-Zero",
        activation_checkpointing=False,
    ):
        super().__init__()
        check_config(input_size, patch_size, hidden_size, num_heads, class_dropout_prob, conditioning)
        # Plain dict of the constructor kwargs, saved with checkpoints so that they rebuild their own model.
        self.config = dict(
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob,
            num_classes=num_classes,
            learn_sigma=learn_sigma,
            conditioning=conditioning,
            activation_checkpointing=activation_checkpointing,
        )
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes, self.conditioning = num_classes, conditioning
        self.activation_checkpointing = activation_checkpointing

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        # A frozen Parameter rather than a buffer: the official checkpoints store it.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        block, final_layer = BLOCKS[conditioning]
        self.blocks = nn.ModuleList([block(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = final_layer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @classmethod
    def from_config(cls, config):
        unknown = set(config) - set(CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown DiT config keys {sorted(unknown)}; allowed: {sorted(CONFIG_KEYS)}")
        return cls(**config)

    def initialize_weights(self):
        """The official initialisation."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        grid_size = self.input_size // self.patch_size
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], grid_size).unsqueeze(0))
        # The patch embedding is a linear map of each flattened patch: initialise it like one.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.conditioning == "adaLN-Zero":
            for layer in [*self.blocks, self.final_layer]:
                nn.init.zeros_(layer.adaLN_modulation[-1].weight)
                nn.init.zeros_(layer.adaLN_modulation[-1].bias)
        # The output starts at exactly zero.
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x, t, y, force_drop_ids=None):
        """x (N, C, H, W) noisy latents, t (N,) timesteps in [0, 999] (int or float), y (N,) int64 labels
        (`num_classes` = the null label) -> (N, out_channels, H, W)."""
        self.check_inputs(x, t, y)
        num_tokens = self.pos_embed.shape[1]
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        t_emb = self.t_embedder(t)  # (N, D)
        y_emb = self.y_embedder(y, force_drop_ids)  # (N, D)
        x, c = self.conditioning_inputs(x, t_emb, y_emb)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        x = self.final_layer(x[:, :num_tokens], c)  # (N, T, p*p*out_channels); drops in-context tokens
        return self.unpatchify(x)

    def conditioning_inputs(self, x, t_emb, y_emb):
        """The token sequence and the condition c that the blocks see, per strategy (paper Fig. 3)."""
        if self.conditioning == "cross-attention":
            return x, torch.stack([t_emb, y_emb], dim=1)  # c: (N, 2, D), the tokens attended to
        if self.conditioning == "in-context":
            return torch.cat([x, t_emb.unsqueeze(1), y_emb.unsqueeze(1)], dim=1), None  # (N, T + 2, D)
        return x, t_emb + y_emb  # adaLN(-Zero): c (N, D)

    def unpatchify(self, x):
        """(N, T, p*p*C) with each token's features ordered (p, p, C) -> (N, C, H, W)."""
        p, c, h = self.patch_size, self.out_channels, self.input_size // self.patch_size
        x = x.reshape(x.shape[0], h, h, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], c, h * p, h * p)

    def check_inputs(self, x, t, y):
        size, channels = self.input_size, self.in_channels
        if x.ndim != 4 or tuple(x.shape[1:]) != (channels, size, size):
            raise ValueError(f"x must have shape (N, {channels}, {size}, {size}), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(f"t and y must have shape ({x.shape[0]},), got {tuple(t.shape)} and {tuple(y.shape)}")

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=3):
        """Classifier-free guidance in the official batching: the batch is [cond half; uncond half] (y of the second
        half = num_classes) and both halves get the noise of the first half. Returns the guided eps (same for both
        halves) on the first `cfg_channels` output channels, eps = uncond + cfg_scale * (cond - uncond);
        3 reproduces the official sampler, None guides all eps channels (the standard form). The remaining channels
        (and the variance) pass through unguided, as in the official code."""
        if self.y_embedder.dropout_prob == 0:
            raise ValueError("forward_with_cfg needs a null label: build the model with class_dropout_prob > 0")
        channels = self.in_channels if cfg_channels is None else cfg_channels
        if not 0 < channels <= self.in_channels:
            raise ValueError(f"cfg_channels must be in [1, {self.in_channels}] or None, got {cfg_channels}")
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch [cond; uncond], got {x.shape[0]}")
        half = x[: x.shape[0] // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = model_out[:, :channels], model_out[:, channels:]
        cond_eps, uncond_eps = eps.chunk(2, dim=0)
        guided_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([guided_eps, guided_eps], dim=0), rest], dim=1)


CONFIG_KEYS = tuple(inspect.signature(DiT).parameters)


def check_config(input_size, patch_size, hidden_size, num_heads, class_dropout_prob, conditioning):
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
    if input_size % patch_size:
        raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by 4 for the 2-D sin-cos position table")
    if not 0 <= class_dropout_prob < 1:
        raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}")


# ------------------------------ The paper's configs (Table 1)

SIZES = {  # name: (depth, hidden_size, num_heads)
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    "Ti": (6, 192, 3),  # NOT in the paper: a CPU-sized model for the offline default on 8x8 latents
    # NOT in the paper either: CPU-sized points of one depth/width family with Ti (width = 32 x depth, heads =
    # depth / 2, mlp ratio 4), for the offline sweep's model-size study (docs/study-plan.md). Named by depth x width.
    "4x128": (4, 128, 2),
    "8x256": (8, 256, 4),
}
CPU_SIZES = ("Ti", "4x128", "8x256")  # the sizes a CPU trains in minutes on 8x8 latents


def preset(depth, hidden_size, num_heads, patch_size):
    def build(**kwargs):
        fixed = {"depth", "hidden_size", "num_heads", "patch_size"} & set(kwargs)
        if fixed:
            raise ValueError(f"{sorted(fixed)} are fixed by the preset; build DiT(...) directly to change them")
        return DiT(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size, **kwargs)

    return build


DiT_models = {
    f"DiT-{size}/{patch_size}": preset(*SIZES[size], patch_size) for size in SIZES for patch_size in (2, 4, 8)
}
# Patch 1 only for Ti: its 64 tokens on the offline default's 8x8 latents are the patch study's smallest patch
# (paper Fig. 6 stops at /2 on 32x32 latents, i.e. 256 tokens; a CPU cannot afford that many).
DiT_models["DiT-Ti/1"] = preset(*SIZES["Ti"], 1)
