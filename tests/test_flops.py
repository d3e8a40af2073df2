"""Tests of the Gflops counter against the paper's Table 1 and against the closed-form count of a DiT."""

import pytest

from pipeline.flops import count_gflops, count_gflops_latent, count_ops, count_parameters, paper_round

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize(
    "model_name, paper_gflops",
    [("DiT-S/4", 1.4), ("DiT-B/4", 5.6), ("DiT-L/4", 19.7), ("DiT-XL/4", 29.1), ("DiT-XL/2", 118.6)],
)
def test_table_1(model_name, paper_gflops):
    assert paper_round(count_gflops(model_name, image_size=256)) == paper_gflops


def test_closed_form_count_of_dit_s2():
    """Per block 12 T D^2 (qkv, proj, 4x MLP) + 2 T^2 D (attention), plus the embedders, adaLN and final layer."""
    T, D, depth, p, C = 16 * 16, 384, 12, 2, 4
    blocks = depth * (12 * T * D * D + 2 * T * T * D + 6 * D * D)
    embed = T * C * p * p * D + 256 * D + D * D  # patchify, timestep MLP
    final = 2 * D * D + T * D * p * p * 2 * C
    macs, normalised = count_ops("DiT-S/2", latent_size=32)
    assert macs == blocks + embed + final
    assert normalised == (2 * depth + 1) * T * D
    params = (
        depth * (18 * D * D + 15 * D)
        + (C * p * p * D + D)
        + (256 * D + D * D + 2 * D)
        + 1001 * D
        + T * D
        + (2 * D * D + 2 * D)
        + (D + 1) * p * p * 2 * C
    )
    assert count_parameters("DiT-S/2", 32) == params


def test_paper_round_is_two_stage():
    assert paper_round(29.0479) == 29.1  # 29.05 in the two-decimal table
    assert paper_round(118.6382) == 118.6
    assert paper_round(1.4132) == 1.4


def test_conditioning_costs():
    base = count_gflops_latent("DiT-S/2", 32)
    cross = count_gflops_latent("DiT-S/2", 32, "cross-attention")
    assert 0.10 < cross / base - 1 < 0.20  # the paper: "roughly a 15% overhead"
    assert count_gflops_latent("DiT-S/2", 32, "adaLN") < base  # "adaLN adds the least Gflops"
    assert count_gflops_latent("DiT-S/2", 32, "in-context") > base  # two more tokens


def test_unknown_model_is_rejected():
    with pytest.raises(ValueError, match="unknown model"):
        count_gflops("DiT-XXL/2")
    with pytest.raises(ValueError, match="multiple of the VAE"):
        count_gflops("DiT-S/2", image_size=250)
