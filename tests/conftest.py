import json
import os
import secrets

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
        latents = {"latent_shape": [4, 8, 8], "scaling_factor": 0.5, "image_size": 16, "num_classes": num_classes,
                   "class_names": [f"class{c}" for c in range(num_classes)]}
        diffusion = {"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True}
        write_model_card(dit_dir, {"w": torch.arange(4.0)}, "DiT-Ti/2", {"input_size": 8}, diffusion, latents, 0)
        return json.loads((dit_dir / "model.json").read_text())["ema_sha256"]
    return write


def _tiny_vae(scaling_factor: float, seed: int = 0, block_out_channels=(8, 16), norm_num_groups: int = 4):
    """A random AutoencoderKL with downsample 2 (16x16 images <-> 4x8x8 latents), in eval mode."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=block_out_channels,
                         layers_per_block=1, latent_channels=4, norm_num_groups=norm_num_groups, sample_size=16,
                         scaling_factor=scaling_factor).eval()


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
