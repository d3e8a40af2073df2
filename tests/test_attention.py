"""`train.attention` / `sample.attention`: the param picks the SDPA kernel that runs, and every kernel available on
the CPU gives the math kernel's numbers within float32 rounding (the CUDA-only ones are checked on the device, in
bench/gpu_checks.sh)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import pipeline.train as T
from pipeline.attention import attention_backend
from pipeline.diffusion import DIT_DIFFUSION
from pipeline.generate import generate_images
from pipeline.params.load import ParamsError, load_section
from pipeline.params.rules import check_attention
from pipeline.params.sample import SampleParams
from pipeline.params.train import TrainParams

REPO = Path(__file__).resolve().parents[1]
TINY = dict(depth=2, hidden_size=64, num_heads=2)
LATENT_SHAPE, NUM_CLASSES = (4, 8, 8), 4
# The aten op each CPU backend dispatches to (what the profiler sees inside scaled_dot_product_attention).
CPU_KERNEL = {
    "math": "aten::_scaled_dot_product_attention_math",
    "flash": "aten::_scaled_dot_product_flash_attention_for_cpu",
}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def sdpa_ops(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_the_backend_param_picks_the_kernel_and_matches_math(backend):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 17, 32) for _ in range(3))
    with attention_backend("math"):
        reference = F.scaled_dot_product_attention(q, k, v)
    with attention_backend(backend):
        ops = sdpa_ops(lambda: F.scaled_dot_product_attention(q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
    assert CPU_KERNEL[backend] in ops and not (set(CPU_KERNEL.values()) - {CPU_KERNEL[backend]}) & ops, ops
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_a_train_step_runs_the_chosen_kernel_forward_and_backward(backend, perturb):
    """The same step under `auto`, math and flash: the chosen kernel runs, and the loss, the gradient norm and the
    updated weights agree with math's within float32 rounding."""
    results = {}
    for name in ("math", backend):
        p = replace(
            load_section(TrainParams, "train", REPO / "params.yaml"),
            num_workers=0,
            use_gpu=False,
            precision="fp32",
            compile=False,
            attention=name,
        )
        torch.manual_seed(0)
        model = perturb(T.build_model(p, LATENT_SHAPE, NUM_CLASSES, TINY), 0)  # adaLN-Zero would gate attention off
        state = T.make_train_state(model, p, torch.device("cpu"), world=1, ckpt=None)
        torch.manual_seed(1)
        x, y = torch.randn(8, *LATENT_SHAPE), torch.randint(0, NUM_CLASSES, (8,))
        ops = sdpa_ops(lambda: results.__setitem__(name, T.train_step(state, x, y, lr=p.lr)))
        assert CPU_KERNEL[name] in ops, ops
        results[name] = (results[name], [q.detach().clone() for q in state.trainable])
    (stats_m, weights_m), (stats_b, weights_b) = results["math"], results[backend]
    torch.testing.assert_close(stats_b, stats_m, atol=1e-5, rtol=1e-4)
    for a, b in zip(weights_b, weights_m):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_sampling_with_flash_matches_math(tiny_vae, perturb):
    torch.manual_seed(0)
    p = replace(load_section(TrainParams, "train", REPO / "params.yaml"), num_workers=0, use_gpu=False)
    model = perturb(T.build_model(p, LATENT_SHAPE, NUM_CLASSES, TINY), 0).eval()
    vae = tiny_vae(0.5)
    kwargs = dict(
        seed=0,
        sampler="ddim",
        steps=3,
        cfg_scale=1.5,
        cfg_channels=None,
        num_classes=NUM_CLASSES,
        latent_shape=LATENT_SHAPE,
        device="cpu",
        batch_size=4,
        micro_batch=4,
        precision="fp32",
        diffusion={**DIT_DIFFUSION, "learn_sigma": True},
    )
    labels, indices = np.array([0, 1, 2, 3]), np.arange(4)
    images = {a: generate_images(model, vae, labels, indices, attention=a, **kwargs) for a in ("math", "flash")}
    auto = generate_images(model, vae, labels, indices, attention="auto", **kwargs)
    assert images["math"].std() > 5 and not np.array_equal(images["math"], np.roll(images["math"], 1, axis=0))
    # uint8 pixels: float32 rounding may flip a value by one step at a rounding boundary, no more
    for other in (images["flash"], auto):
        assert np.abs(images["math"].astype(int) - other.astype(int)).max() <= 1


@pytest.mark.parametrize("backend", ["efficient", "cudnn"])
def test_cuda_only_backends_are_refused_on_the_cpu(backend):
    with pytest.raises(ParamsError, match="CUDA kernel"):
        check_attention("train", backend, use_gpu=False)
    base = load_section(SampleParams, "sample", REPO / "params.yaml")
    with pytest.raises(ParamsError, match="sample.attention"):
        replace(base, attention=backend)
    check_attention("sample", backend, use_gpu=True)  # allowed where CUDA is asked for


def test_an_unknown_backend_is_one_clear_error():
    with pytest.raises(ParamsError, match="not one of"):
        attention_backend("xformers")
