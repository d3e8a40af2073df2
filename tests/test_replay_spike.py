"""bench/replay_spike.py: the terms it shows for a step are that step's, as the training loop drew and scored it, and
its scan finds a network whose noise prediction has blown up."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tiny_train import TINY, base_params

import pipeline.train as T

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from replay_spike import blown_up, per_example_terms  # noqa: E402


def tiny_state(latents: Path):
    p = base_params(global_batch_size=8)
    data, manifest = T.load_latent_batches(latents, p.seed, torch.device("cpu"))
    model = T.build_model(p, manifest["latent_shape"], manifest["num_classes"], TINY)
    return T.make_train_state(model, p, torch.device("cpu"), 1, None), data


def test_the_replayed_terms_are_the_steps_own(latents):
    s, data = tiny_state(latents)
    for step in range(3):
        terms = per_example_terms(s, data, step)  # before the update, with the step's own draws
        logged = T.run_step(s, data, step, 0, 1)
        assert terms["loss"].shape == (8,)
        assert torch.allclose(terms["loss"].mean(), logged[0], rtol=1e-5)
        assert torch.allclose(terms["vb"].mean(), logged[2], rtol=1e-5)


def test_the_scan_finds_a_blown_up_prediction(latents):
    s, data = tiny_state(latents)
    every_37th = range(0, 1000, 37)
    assert blown_up(s, data, 10.0, every_37th) == "none"
    with torch.no_grad():
        s.model.final_layer.linear.bias.fill_(1e3)  # every prediction far off, at every timestep and label
    found = blown_up(s, data, 10.0, every_37th)
    assert found.startswith("t=0: 5 labels, up to ") and "t=962: 5 labels" in found
