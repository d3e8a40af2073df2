"""`train.fp8`: torchao's Float8 linear layers in the DiT blocks. On the CPU, torchao's emulation (the same float8
casts and scales, float32 matmuls) checks the module swap and the numerics; the speed is measured on the device."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import pipeline.train as T
from pipeline.fp8 import convert_to_fp8
from pipeline.params.load import ParamsError, load_section
from pipeline.params.rules import check_fp8
from pipeline.params.train import TrainParams

REPO = Path(__file__).resolve().parents[1]
TINY = dict(depth=2, hidden_size=64, num_heads=2)
LATENT_SHAPE, NUM_CLASSES = (4, 8, 8), 4

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def params(**changes) -> TrainParams:
    p = load_section(TrainParams, "train", REPO / "params.yaml")
    return replace(p, num_workers=0, use_gpu=False, precision="fp32", compile=False, lr=1e-3, warmup_steps=0, **changes)


def test_fp8_on_needs_cuda_and_bf16():
    with pytest.raises(ParamsError, match="train.fp8' float8 needs"):
        params(fp8="float8")
    check_fp8("train", "float8", use_gpu=True, precision="bf16")
    check_fp8("train", "emulate", use_gpu=False, precision="fp32")


def test_emulated_fp8_swaps_the_block_linears_and_tracks_fp32_training(perturb):
    pytest.importorskip("torchao", reason="the gpu extra: make test LOCK=requirements/lock-gpu.txt (as CI does)")
    from torchao.float8.float8_linear import Float8Linear

    losses, states = {}, {}
    for mode in ("none", "emulate"):
        p = params(fp8=mode)
        torch.manual_seed(0)
        model = perturb(T.build_model(p, LATENT_SHAPE, NUM_CLASSES, TINY), 0)
        keys = list(model.state_dict())
        state = T.make_train_state(model, p, torch.device("cpu"), world=1, ckpt=None)
        swapped = [n for n, m in state.model.named_modules() if isinstance(m, Float8Linear)]
        if mode == "emulate":
            # every Linear of both blocks (qkv, proj, fc1, fc2, adaLN), none outside them; the EMA stays plain
            assert len(swapped) == 2 * 5 and all(n.startswith("blocks.") for n in swapped), swapped
            assert not any(isinstance(m, Float8Linear) for m in state.ema.modules())
            assert list(state.model.state_dict()) == keys  # checkpoints keep their layout
        else:
            assert swapped == []
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(64, *LATENT_SHAPE, generator=g), torch.randint(0, NUM_CLASSES, (64,), generator=g)
        curve = []
        for step in range(30):
            torch.manual_seed(step)
            curve.append(T.train_step(state, x, y, lr=p.lr)[0].item())
        losses[mode], states[mode] = curve, state
    off, fp8 = torch.tensor(losses["none"]), torch.tensor(losses["emulate"])
    assert fp8[-5:].mean() < 0.8 * fp8[:5].mean()  # it learns
    # float8 e4m3 keeps 3 mantissa bits: per-step losses within a few percent of fp32's, over the whole run
    assert ((fp8 - off).abs() / off).max() < 0.05, (off, fp8)
    assert convert_to_fp8(torch.nn.Linear(4, 4), "none") == 0
