"""Tests of the DiT network: official layout, parity with diffusers, init, guidance, label dropout, training."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import Timesteps

from pipeline.model import CONDITIONINGS, DiT, DiT_models, TimestepEmbedder

# The official DiT-XL/2 256x256 checkpoint's layout: 292 keys -> shapes (a copy of shared/reference).
REFERENCE = Path(__file__).parent / "data" / "dit_xl2_256_state_dict_layout.json"

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_dit(**overrides):
    torch.manual_seed(0)
    return DiT(**{**TINY, **overrides})


def inputs(n=6, num_classes=10, size=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, t, y


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------- official layout


def test_xl2_layout_matches_the_official_state_dict():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32, num_classes=1000)
    reference = json.loads(REFERENCE.read_text())
    layout = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(layout) == list(reference)  # same keys, same order
    assert layout == reference
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    assert not model.pos_embed.requires_grad


def test_presets():
    names = [f"DiT-{s}/{p}" for s in ("XL", "L", "B", "S", "Ti", "4x128", "8x256") for p in (2, 4, 8)]
    assert list(DiT_models) == names + ["DiT-Ti/1"]
    with torch.device("meta"):
        b4 = DiT_models["DiT-B/4"](input_size=32, num_classes=1000)
    assert (len(b4.blocks), b4.pos_embed.shape) == (12, (1, 64, 768))
    assert b4.blocks[0].attn.num_heads == 12
    with pytest.raises(ValueError, match="fixed by the preset"):
        DiT_models["DiT-S/2"](depth=3)


def test_cpu_presets_are_one_depth_width_family():
    """The offline sweep's model sizes (docs/study-plan.md): width = 32 x depth, heads = depth / 2, mlp ratio 4,
    so each is a point on one line; Ti/1 gives 64 tokens on the default's 8x8 latents."""
    with torch.device("meta"):
        for name, depth in (("DiT-4x128/2", 4), ("DiT-Ti/2", 6), ("DiT-8x256/2", 8)):
            m = DiT_models[name](input_size=8, num_classes=10)
            shape = (len(m.blocks), m.config["hidden_size"], m.blocks[0].attn.num_heads)
            assert shape == (depth, 32 * depth, depth // 2)
            assert m.blocks[0].mlp.fc1.out_features == 4 * 32 * depth
        assert {p: DiT_models[f"DiT-Ti/{p}"](input_size=8, num_classes=10).pos_embed.shape[1] for p in (1, 2, 4)} == {
            1: 64,
            2: 16,
            4: 4,
        }


def test_state_dict_round_trip_loads_strict(tmp_path, perturb):
    model = perturb(tiny_dit(), seed=1).eval()
    path = tmp_path / "ema.pt"
    torch.save(model.state_dict(), path)
    state = torch.load(path, weights_only=True, map_location="cpu")
    fresh = DiT.from_config(model.config)  # the checkpoint's own config rebuilds the architecture
    fresh.load_state_dict(state, strict=True)
    x, t, y = inputs()
    assert torch.equal(fresh.eval()(x, t, y), model(x, t, y))


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="conditioning"):
        tiny_dit(conditioning="film")
    with pytest.raises(ValueError, match="divisible by patch_size"):
        tiny_dit(input_size=9)
    with pytest.raises(ValueError, match="unknown DiT config keys"):
        DiT.from_config({**TINY, "dropout": 0.1})
    with pytest.raises(ValueError, match=r"shape \(N, 4, 8, 8\)"):
        tiny_dit()(torch.zeros(2, 4, 16, 16), torch.zeros(2), torch.zeros(2, dtype=torch.long))


# --------------------------------------------------------------------------- parity with diffusers


def to_diffusers(state, depth):
    """Our (= official) state_dict in diffusers' DiTTransformer2DModel layout, following the key mapping of
    diffusers' scripts/convert_dit_to_diffusers.py: the t/y embedders are copied into every block's norm1.emb,
    qkv is split into to_q/to_k/to_v, the final adaLN becomes proj_out_1 and the final linear proj_out_2."""
    out = {
        "pos_embed.proj.weight": state["x_embedder.proj.weight"],
        "pos_embed.proj.bias": state["x_embedder.proj.bias"],
    }
    for i in range(depth):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = theirs + "norm1.emb."
        for j, k in ((1, 0), (2, 2)):
            for kind in ("weight", "bias"):
                out[f"{emb}timestep_embedder.linear_{j}.{kind}"] = state[f"t_embedder.mlp.{k}.{kind}"]
        out[emb + "class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"]
        for kind in ("weight", "bias"):
            out[f"{theirs}norm1.linear.{kind}"] = state[f"{ours}adaLN_modulation.1.{kind}"]
            q, k, v = state[f"{ours}attn.qkv.{kind}"].chunk(3, dim=0)
            out[f"{theirs}attn1.to_q.{kind}"], out[f"{theirs}attn1.to_k.{kind}"], out[f"{theirs}attn1.to_v.{kind}"] = (
                q,
                k,
                v,
            )
            out[f"{theirs}attn1.to_out.0.{kind}"] = state[f"{ours}attn.proj.{kind}"]
            out[f"{theirs}ff.net.0.proj.{kind}"] = state[f"{ours}mlp.fc1.{kind}"]
            out[f"{theirs}ff.net.2.{kind}"] = state[f"{ours}mlp.fc2.{kind}"]
    for kind in ("weight", "bias"):
        out[f"proj_out_1.{kind}"] = state[f"final_layer.adaLN_modulation.1.{kind}"]
        out[f"proj_out_2.{kind}"] = state[f"final_layer.linear.{kind}"]
    return out


def diffusers_peer(model, official_timesteps=True):
    cfg = model.config
    peer = DiTTransformer2DModel(
        num_attention_heads=cfg["num_heads"],
        attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
        in_channels=cfg["in_channels"],
        out_channels=model.out_channels,
        num_layers=cfg["depth"],
        sample_size=cfg["input_size"],
        patch_size=cfg["patch_size"],
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=cfg["num_classes"],
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=1e-6,  # the official pre-MLP LayerNorm eps (diffusers' default is 1e-5)
    )
    if official_timesteps:
        # diffusers' DiT divides the frequency exponent by (half - 1), the official DiT by half.
        for block in peer.transformer_blocks:
            block.norm1.emb.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    peer.load_state_dict(to_diffusers(model.state_dict(), cfg["depth"]), strict=True)
    return peer.eval()


def test_parity_with_diffusers(perturb):
    model = perturb(tiny_dit(), seed=1).eval()
    peer = diffusers_peer(model)
    for seed in range(4):
        x, t, y = inputs(seed=seed)
        t = t.float() if seed % 2 else t  # integer and float timesteps
        with torch.no_grad():
            ours = model(x, t, y)
            theirs = peer(x, timestep=t, class_labels=y).sample  # all 2C channels: eps then variance
        assert ours.shape == theirs.shape == (6, 8, 8, 8)
        assert torch.equal(ours, theirs), f"relative error {rel_err(ours, theirs):.2e}"  # bit for bit (fp32, CPU)
    # diffusers' own timestep frequencies really differ from the official ones: the adjustment above matters.
    with torch.no_grad():
        assert (
            rel_err(diffusers_peer(model, official_timesteps=False)(x, timestep=t, class_labels=y).sample, ours) > 1e-3
        )


# --------------------------------------------------------------------------- initialisation


def test_adaln_zero_blocks_start_as_identity_and_output_is_zero():
    model = tiny_dit().eval()
    x, t, y = inputs()
    tokens = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    for block in model.blocks:
        assert torch.equal(block(tokens, c), tokens)
    assert torch.count_nonzero(model(x, t, y)) == 0


# --------------------------------------------------------------------------- guidance


def cfg_batch(model, n=3, seed=3):
    x, t, y = inputs(n=2 * n, seed=seed)
    t = torch.cat([t[:n], t[:n]])
    y = torch.cat([y[:n], torch.full((n,), model.num_classes)])
    return x, t, y


def test_cfg_scale_one_is_the_conditional_model(perturb):
    model = perturb(tiny_dit(), seed=1).eval()
    x, t, y = cfg_batch(model)
    with torch.no_grad():
        guided = model.forward_with_cfg(x, t, y, cfg_scale=1.0, cfg_channels=None)
        cond = model(x[:3], t[:3], y[:3])
    for half in (guided[:3], guided[3:]):
        torch.testing.assert_close(half[:, :4], cond[:, :4], atol=1e-6, rtol=1e-5)


def test_cfg_guides_the_first_channels_and_passes_the_rest_through(perturb):
    model = perturb(tiny_dit(), seed=1).eval()
    x, t, y = cfg_batch(model)
    scale = 4.0
    with torch.no_grad():
        both = model(torch.cat([x[:3], x[:3]]), t, y)
        cond, uncond = both[:3], both[3:]
        guided = uncond + scale * (cond - uncond)
        official = model.forward_with_cfg(x, t, y, scale)  # cfg_channels=3
        standard = model.forward_with_cfg(x, t, y, scale, cfg_channels=None)
    for out, channels in ((official, 3), (standard, 4)):
        torch.testing.assert_close(out[:3, :channels], guided[:, :channels])
        torch.testing.assert_close(out[3:, :channels], guided[:, :channels])
        torch.testing.assert_close(out[:, channels:], both[:, channels:])  # unguided, cond then uncond
    assert not torch.allclose(official[:3, 3], standard[:3, 3])


def test_cfg_halves_share_the_noise_of_the_first_half(perturb):
    model = perturb(tiny_dit(), seed=1).eval()
    x, t, y = cfg_batch(model)
    other = torch.cat([x[:3], torch.randn(3, 4, 8, 8)])
    with torch.no_grad():
        assert torch.equal(model.forward_with_cfg(x, t, y, 1.5), model.forward_with_cfg(other, t, y, 1.5))


def test_cfg_rejects_bad_requests():
    model = tiny_dit().eval()
    x, t, y = cfg_batch(model)
    with pytest.raises(ValueError, match="cfg_channels"):
        model.forward_with_cfg(x, t, y, 1.5, cfg_channels=5)
    with pytest.raises(ValueError, match="even batch"):
        model.forward_with_cfg(x[:5], t[:5], y[:5], 1.5)
    with pytest.raises(ValueError, match="null label"):
        tiny_dit(class_dropout_prob=0.0).forward_with_cfg(x, t, y, 1.5)


# --------------------------------------------------------------------------- label dropout


def test_label_dropout_uses_the_null_label_in_training_only():
    model = tiny_dit(class_dropout_prob=0.1)
    embedder, table = model.y_embedder, model.y_embedder.embedding_table.weight
    assert table.shape[0] == 11  # the last row, id num_classes, is the null label
    y = torch.randint(0, 10, (20_000,), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    dropped = (embedder.train()(y) == table[10]).all(dim=1)
    assert abs(dropped.float().mean().item() - 0.1) < 0.01  # binomial std 0.002
    assert torch.equal(embedder.eval()(y), table[y])
    forced = torch.tensor([1, 0, 1])
    assert torch.equal(embedder(y[:3], force_drop_ids=forced), table[torch.tensor([10, y[1], 10])])
    assert DiT(**{**TINY, "class_dropout_prob": 0.0}).y_embedder.embedding_table.weight.shape[0] == 10


def test_eval_forward_is_deterministic(perturb):
    model = perturb(tiny_dit(), seed=1).eval()
    x, t, y = inputs()
    assert torch.equal(model(x, t, y), model(x, t, y))


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_each_conditioning_learns(conditioning):
    model = tiny_dit(conditioning=conditioning, class_dropout_prob=0.0)
    x, t, y = inputs(n=8, seed=4)
    target = torch.randn(8, 8, 8, 8, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(100):
        loss = torch.nn.functional.mse_loss(model(x, t, y), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"{conditioning}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_each_conditioning_sees_t_and_y(conditioning, perturb):
    model = perturb(tiny_dit(conditioning=conditioning), seed=1).eval()
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, y)
        assert rel_err(model(x, (t + 100) % 1000, y), out) > 1e-3
        assert rel_err(model(x, t, (y + 1) % 10), out) > 1e-3


def test_conditioning_variants_have_their_own_layers():
    with torch.device("meta"):
        models = {c: DiT_models["DiT-S/2"](input_size=32, num_classes=1000, conditioning=c) for c in CONDITIONINGS}
    counts = {c: sum(p.numel() for p in m.parameters()) for c, m in models.items()}
    assert counts["adaLN"] < counts["adaLN-Zero"]  # 4 modulation chunks instead of 6
    assert "blocks.0.cross_attn.kv.weight" in models["cross-attention"].state_dict()
    assert "blocks.0.adaLN_modulation.1.weight" not in models["in-context"].state_dict()


def test_bf16_autocast_is_finite_and_close_to_fp32(perturb):
    model = perturb(tiny_dit(), seed=1).eval()
    x, t, y = inputs()
    with torch.no_grad():
        fp32 = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x, t, y)
            t_freq = TimestepEmbedder.timestep_embedding(t)
    assert torch.isfinite(bf16).all()
    assert t_freq.dtype == torch.float32
    assert rel_err(bf16.float(), fp32) < 0.03


def test_activation_checkpointing_gives_the_same_gradients(perturb):
    grads = []
    for checkpointing in (False, True):
        model = perturb(tiny_dit(activation_checkpointing=checkpointing), seed=1).train()
        x, t, y = inputs()
        model(x, t, y, force_drop_ids=torch.tensor([0, 1, 0, 0, 1, 0])).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_forward_compiles_without_graph_breaks(checkpointing, perturb):
    model = perturb(tiny_dit(activation_checkpointing=checkpointing), seed=1).train()
    x, t, y = inputs()
    explanation = torch._dynamo.explain(model)(x, t, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    x, t, y = cfg_batch(model.eval())
    explanation = torch._dynamo.explain(model.forward_with_cfg)(x, t, y, 1.5)
    assert explanation.graph_break_count == 0, explanation.break_reasons
