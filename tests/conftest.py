import json
import os

import pytest
import torch

# Belt and braces for runs that bypass `make test`: no hub lookups, no Ray auth warning, no DVC analytics.
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "DVC_NO_ANALYTICS": "1",
}.items():
    os.environ.setdefault(key, value)


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
