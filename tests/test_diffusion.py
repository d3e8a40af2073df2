"""Tests of pipeline/diffusion.py against diffusers' schedulers and closed forms, on tiny CPU stand-in networks."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch import nn

from pipeline.diffusion import create_diffusion, dpm_solver_scheduler, guided, max_steps, sample, space_timesteps

C, H, W = 4, 8, 8
NUM_CLASSES = 10
LINEAR = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)
TRAINED = dict(noise_schedule="linear", diffusion_steps=1000, learn_sigma=True)  # what a model card records


class TinyNet(nn.Module):
    """A stand-in for DiT with the same interface: (x, t, y) -> (N, 2C, H, W), and forward_with_cfg.

    It records every timestep batch it receives so tests can check what the diffusion feeds the network."""

    def __init__(self, channels=C, num_classes=NUM_CLASSES, hidden=16):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.t_embed = nn.Linear(1, hidden)
        self.y_embed = nn.Embedding(num_classes + 1, hidden)  # the last row is the null label
        self.conv_out = nn.Conv2d(hidden, 2 * channels, 3, padding=1)
        self.channels, self.seen_t = channels, []

    def forward(self, x, t, y):
        self.seen_t.append(t.detach().cpu().clone())
        cond = self.t_embed(t[:, None].float() / 1000) + self.y_embed(y)
        eps, v = self.conv_out(torch.nn.functional.silu(self.conv_in(x) + cond[:, :, None, None])).chunk(2, dim=1)
        return torch.cat([eps, torch.tanh(v)], dim=1)

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels):
        """The official convention: guide the first cfg_channels of the doubled batch [cond; uncond]."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        k = self.channels if cfg_channels is None else cfg_channels
        cond, uncond = out[:, :k].chunk(2)
        guided_eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided_eps, guided_eps]), out[:, k:]], dim=1)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TinyNet().eval()


def gens(seeds):
    return [torch.Generator().manual_seed(1000 + s) for s in seeds]


# ---------------------------------------------------------------------------------------------------------------
# Schedule and respacing


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_schedule_matches_diffusers(schedule):
    ours = create_diffusion("", noise_schedule=schedule)
    peer = DDPMScheduler(**{**LINEAR, "beta_schedule": schedule})
    assert ours.betas.dtype == np.float64 and ours.num_timesteps == 1000
    np.testing.assert_allclose(ours.betas, peer.betas.double().numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours.alphas_cumprod, peer.alphas_cumprod.double().numpy(), rtol=2e-5)


def test_linear_schedule_is_scaled_by_1000_over_T():
    betas = create_diffusion("", diffusion_steps=250).betas
    assert betas[0] == pytest.approx(4e-4) and betas[-1] == pytest.approx(0.08) and len(betas) == 250


def test_respacing_matches_adm_and_diffusers_spacing():
    d250 = create_diffusion("250")
    kept = d250.timestep_map.tolist()
    assert d250.num_timesteps == 250 and kept[0] == 0 and kept[-1] == 999
    assert kept == [round(j * 999 / 249) for j in range(250)]  # ADM: evenly spaced, first and last kept
    peer = DDPMScheduler(**LINEAR, timestep_spacing="linspace")
    peer.set_timesteps(250)
    assert kept == peer.timesteps.flip(0).tolist()
    assert create_diffusion("ddim50").timestep_map.tolist() == list(range(0, 1000, 20))
    sections = space_timesteps(1000, "10,15,20")  # ADM's three sections of 334, 333, 333 steps
    assert len(sections) == 45 and sections[:2] == [0, 37] and sections[9] == 333 and sections[10] == 334
    assert sections[-1] == 999
    # ADM accumulates the fractional stride; at "21" the sum lands at 499.4999... where 10 * 49.95 gives 500
    assert space_timesteps(1000, "21")[10] == 499 and len(space_timesteps(1000, "21")) == 21
    with pytest.raises(ValueError, match="exactly 999 DDIM steps"):
        create_diffusion("ddim999")


def test_respaced_betas_keep_alphas_cumprod():
    base, spaced = create_diffusion(""), create_diffusion("25")
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map.numpy()], rtol=1e-12)


@pytest.mark.parametrize("respacing", ["25", "ddim10"])
def test_model_receives_original_timesteps(net, respacing):
    diffusion = create_diffusion(respacing)
    y = torch.arange(3)
    diffusion.p_sample_loop(net, (3, C, H, W), model_kwargs={"y": y}, device="cpu")
    expected = diffusion.timestep_map.flip(0).tolist()
    assert [t[0].item() for t in net.seen_t] == expected and all((t == t[0]).all() for t in net.seen_t)
    net.seen_t.clear()
    t = torch.tensor([0, 5, diffusion.num_timesteps - 1])
    diffusion.training_losses(net, torch.randn(3, C, H, W), t, model_kwargs={"y": y})
    assert net.seen_t[0].tolist() == diffusion.timestep_map[t].tolist()


# ---------------------------------------------------------------------------------------------------------------
# Closed forms


def test_q_sample_closed_form():
    d = create_diffusion("")
    t = torch.tensor([0, 250, 999])
    x0, noise = torch.full((3, C, H, W), 0.7), torch.randn(3, C, H, W)
    ab = torch.tensor(d.alphas_cumprod[[0, 250, 999]], dtype=torch.float32).view(-1, 1, 1, 1)
    torch.testing.assert_close(d.q_sample(x0, t, noise=noise), ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    many = torch.stack([d.q_sample(x0, t) for _ in range(200)])  # (200, 3, C, H, W): 12800 draws per t
    mean, var = many.mean(dim=(0, 2, 3, 4)), many.var(dim=(0, 2, 3, 4))
    torch.testing.assert_close(mean, 0.7 * ab.flatten().sqrt(), atol=0.03, rtol=0)
    torch.testing.assert_close(var, 1 - ab.flatten(), atol=0.03, rtol=0.03)


@pytest.mark.parametrize("respacing", ["", "50"])
def test_posterior_is_the_gaussian_conditional(respacing):
    """q(x_{t-1} | x_t, x_0) from Bayes' rule on q(x_{t-1} | x_0) and q(x_t | x_{t-1}), computed independently."""
    d = create_diffusion(respacing)
    t = torch.tensor([1, 7, d.num_timesteps - 1])
    ab, ab_prev = d.alphas_cumprod[t.numpy()], d.alphas_cumprod[t.numpy() - 1]
    alpha = ab / ab_prev
    precision = 1 / (1 - ab_prev) + alpha / (1 - alpha)
    x0, xt = torch.randn(3, C, H, W, dtype=torch.float64), torch.randn(3, C, H, W, dtype=torch.float64)
    view = lambda a: torch.tensor(a).view(-1, 1, 1, 1)  # noqa: E731
    expected_mean = view(np.sqrt(ab_prev) / (1 - ab_prev)) * x0 + view(np.sqrt(alpha) / (1 - alpha)) * xt
    expected_mean = expected_mean / view(precision)
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.flatten().double(), torch.tensor(1 / precision), rtol=1e-5, atol=0)
    torch.testing.assert_close(log_var.flatten().double(), torch.tensor(-np.log(precision)), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "respacing,t", [("", 1), ("", 10), ("", 500), ("", 999), ("250", 1), ("250", 120), ("250", 249)]
)
def test_p_mean_variance_matches_diffusers_learned_range(respacing, t):
    """Our p(x_{t-1} | x_t) for a fixed (eps, v) equals one DDPMScheduler(variance_type="learned_range") step.

    The peer runs in float64: its float32 cumprod loses ~1e-4 of relative precision in 1 - abar near t = 0
    (a float32 peer differs by up to ~2e-4 there), while our tables are float64, rounded to float32 per value."""
    d = create_diffusion(respacing)
    peer = DDPMScheduler(**LINEAR, variance_type="learned_range", clip_sample=False)
    peer.alphas_cumprod, peer.one = torch.cumprod(1 - peer.betas.double(), 0), torch.tensor(1.0, dtype=torch.float64)
    if respacing:
        peer.set_timesteps(timesteps=d.timestep_map.flip(0).tolist())
    torch.manual_seed(t)
    x, eps = torch.randn(2, 2, C, H, W, dtype=torch.float64)
    v = torch.rand(2, C, H, W, dtype=torch.float64) * 2 - 1  # the learned-range value in [-1, 1]
    out = d.p_mean_variance(lambda *_: torch.cat([eps, v], dim=1), x, torch.full((2,), t), clip_denoised=False)
    original_t = int(d.timestep_map[t])
    peer_log_var = peer._get_variance(original_t, predicted_variance=v)
    step = peer.step(torch.cat([eps, v], dim=1), original_t, x, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    peer_mean = step.prev_sample - torch.exp(0.5 * peer_log_var) * noise
    err_mean, err_log_var = (out["mean"] - peer_mean).abs().max(), (out["log_variance"] - peer_log_var).abs().max()
    print(
        f"diffusers learned_range parity at {respacing or 'full'} t={t}: mean {err_mean:.2e}, "
        f"log_variance {err_log_var:.2e}"
    )
    assert err_mean < 1e-5 and err_log_var < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Training losses


def test_training_losses_hybrid():
    d = create_diffusion("")
    torch.manual_seed(0)
    x0, noise = torch.rand(4, C, H, W) * 1.6 - 0.8, torch.randn(4, C, H, W)
    t = torch.tensor([0, 3, 400, 999])
    output = torch.randn(4, 2 * C, H, W).requires_grad_()
    model_out = torch.cat([output[:, :C], torch.tanh(output[:, C:])], dim=1)  # eps, then v in [-1, 1]
    terms = d.training_losses(lambda *_: model_out, x0, t, noise=noise)
    torch.testing.assert_close(terms["mse"], ((noise - output[:, :C]) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    # vb trains only the variance: no gradient reaches the eps channels
    (grad,) = torch.autograd.grad(terms["vb"].sum(), output, retain_graph=True)
    assert grad[:, :C].abs().max() == 0 and grad[:, C:].abs().min(dim=1).values.max() > 0
    (grad,) = torch.autograd.grad(terms["mse"].sum(), output)
    assert grad[:, C:].abs().max() == 0
    # vb at t > 0 is KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits per dim, via torch.distributions
    x_t = d.q_sample(x0, t, noise=noise)
    true_mean, _, true_log_var = d.q_posterior_mean_variance(x0, x_t, t)
    p = d.p_mean_variance(lambda *_: model_out.detach(), x_t, t, clip_denoised=False)
    q_dist = torch.distributions.Normal(true_mean, (0.5 * true_log_var).exp())
    kl = torch.distributions.kl_divergence(q_dist, torch.distributions.Normal(p["mean"], p["variance"].sqrt()))
    torch.testing.assert_close(terms["vb"][1:].detach(), kl.mean(dim=(1, 2, 3))[1:] / math.log(2), rtol=1e-4, atol=1e-6)
    # vb at t = 0 is the discretized decoder NLL of x_0 (exact normal CDF here; the official uses a tanh fit)
    p0 = torch.distributions.Normal(p["mean"][0].double(), p["variance"][0].sqrt().double())
    prob = p0.cdf(x0[0].double() + 1 / 255) - p0.cdf(x0[0].double() - 1 / 255)
    assert terms["vb"][0].item() == pytest.approx(-prob.log().mean().item() / math.log(2), rel=1e-2)


def test_vb_rescaled_by_num_timesteps_over_1000():
    torch.manual_seed(0)
    x0, noise, t = torch.rand(2, C, H, W) - 0.5, torch.randn(2, C, H, W), torch.tensor([5, 60])
    out = torch.cat([torch.randn(2, C, H, W), torch.rand(2, C, H, W) * 2 - 1], dim=1)
    plain = create_diffusion("", diffusion_steps=100).training_losses(lambda *_: out, x0, t, noise=noise)
    rescaled = create_diffusion("", diffusion_steps=100, rescale_learned_sigmas=True)
    scaled = rescaled.training_losses(lambda *_: out, x0, t, noise=noise)
    torch.testing.assert_close(scaled["vb"], plain["vb"] * 0.1)
    torch.testing.assert_close(scaled["mse"], plain["mse"])


# ---------------------------------------------------------------------------------------------------------------
# Samplers


def test_ddim_eta0_is_deterministic_and_matches_diffusers(net):
    d = create_diffusion("ddim10")
    y, noise = torch.tensor([1, 2]), torch.randn(2, C, H, W)
    runs = []
    for seed in (1, 2):  # a different global RNG state must not matter at eta = 0
        torch.manual_seed(seed)
        runs.append(d.ddim_sample_loop(net, noise.shape, noise=noise, clip_denoised=False, model_kwargs={"y": y}))
    assert torch.equal(runs[0], runs[1])
    peer = DDIMScheduler(**LINEAR, clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
    peer.alphas_cumprod = torch.cumprod(1 - peer.betas.double(), 0)  # float64, as our tables (see above)
    peer.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    peer.set_timesteps(10)
    x = noise.double()
    for t in peer.timesteps:
        with torch.no_grad():
            eps = net(x.float(), t.expand(2), y)[:, :C]
        x = peer.step(eps.double(), t, x, eta=0.0).prev_sample
    err = ((runs[0] - x).abs().max() / x.abs().max()).item()  # relative to the scale: an untrained net blows up
    print(f"DDIM-10 parity with diffusers: {err:.2e} of max |x| = {x.abs().max():.0f}")
    assert err < 1e-6


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_dpm_solver_matches_diffusers(net, cfg_scale):
    """sample() equals diffusers' DPM-Solver++ driven directly on the official doubled batch [z; z], [y; null]."""
    y, steps = torch.tensor([0, 3, 7]), 8
    ours = sample(
        net,
        sampler="dpm-solver++",
        steps=steps,
        shape=(3, C, H, W),
        y=y,
        cfg_scale=cfg_scale,
        cfg_channels=None,
        generators=gens(range(3)),
        num_classes=NUM_CLASSES,
        device="cpu",
        **TRAINED,
    )
    peer = DPMSolverMultistepScheduler(
        **LINEAR, algorithm_type="dpmsolver++", prediction_type="epsilon", solver_order=2
    )
    peer.set_timesteps(steps)
    z = torch.stack([torch.randn(C, H, W, generator=g) for g in gens(range(3))])
    x, y2 = torch.cat([z, z]), torch.cat([y, torch.full_like(y, NUM_CLASSES)])  # the official doubled batch
    for t in peer.timesteps:
        with torch.no_grad():  # guided: forward_with_cfg on the doubled batch; unguided: the plain forward
            guided_out = cfg_scale != 1
            out = net.forward_with_cfg(x, t.expand(6), y2, cfg_scale, None) if guided_out else net(x, t.expand(6), y2)
        x = peer.step(out[:, :C], t, x).prev_sample
    print(f"DPM-Solver++ parity with diffusers (cfg {cfg_scale}): {(ours - x[:3]).abs().max():.2e}")
    torch.testing.assert_close(ours, x[:3], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("schedule,steps", [("linear", 1000), ("linear", 250), ("squaredcos_cap_v2", 1000)])
def test_dpm_solver_scheduler_uses_our_schedule(schedule, steps):
    ours = create_diffusion("", noise_schedule=schedule, diffusion_steps=steps).alphas_cumprod
    peer = dpm_solver_scheduler(schedule, steps).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(peer, ours, rtol=2e-5)


def test_ddpm_guided_matches_official_doubled_batch(net):
    """sample() equals the official protocol: p_sample_loop on [z; z] with forward_with_cfg as the model."""
    y, cfg_scale, steps = torch.tensor([4, 9]), 3.0, 10
    ours = sample(
        net,
        sampler="ddpm",
        steps=steps,
        shape=(2, C, H, W),
        y=y,
        cfg_scale=cfg_scale,
        cfg_channels=3,
        generators=gens([0, 1]),
        num_classes=NUM_CLASSES,
        device="cpu",
        **TRAINED,
    )
    z = torch.stack([torch.randn(C, H, W, generator=g) for g in gens([0, 1])])
    first, second = gens([0, 1]), gens([5, 6])
    for g in first:
        torch.randn(C, H, W, generator=g)  # the initial draw; both halves then start from the same z
    y2 = torch.cat([y, torch.full_like(y, NUM_CLASSES)])
    official = create_diffusion(str(steps)).p_sample_loop(
        net.forward_with_cfg,
        (4, C, H, W),
        noise=torch.cat([z, z]),
        clip_denoised=False,
        model_kwargs=dict(y=y2, cfg_scale=cfg_scale, cfg_channels=3),
        generators=first + second,
    )
    assert torch.equal(ours, official[:2])


@pytest.mark.parametrize("sampler,steps", [("ddpm", 10), ("ddim", 10), ("dpm-solver++", 6)])
def test_samples_do_not_depend_on_the_batch_split(net, sampler, steps):
    y = torch.tensor([0, 1, 2, 3, 4])
    kw = dict(
        sampler=sampler, steps=steps, cfg_scale=2.5, cfg_channels=None, num_classes=NUM_CLASSES, device="cpu", **TRAINED
    )
    whole = sample(net, shape=(5, C, H, W), y=y, generators=gens(range(5)), **kw)
    parts = [sample(net, shape=(len(ix), C, H, W), y=y[ix], generators=gens(ix), **kw) for ix in ([0, 1, 2], [3, 4])]
    again = sample(net, shape=(5, C, H, W), y=y, generators=gens(range(5)), **kw)
    assert torch.equal(whole, again)
    assert torch.equal(whole, torch.cat(parts))
    assert not torch.equal(whole[0], whole[1])


@pytest.mark.parametrize("sampler", ["ddpm", "dpm-solver++"])
def test_guidance_at_scale_one_equals_unguided(net, sampler):
    y = torch.tensor([1, 5, 8])
    kw = dict(
        sampler=sampler,
        steps=6,
        shape=(3, C, H, W),
        y=y,
        cfg_channels=None,
        num_classes=NUM_CLASSES,
        device="cpu",
        **TRAINED,
    )
    plain = sample(net, cfg_scale=1.0, generators=gens(range(3)), **kw)
    through_cfg = sample(guided_as_model(net), cfg_scale=1.0, generators=gens(range(3)), **kw)
    torch.testing.assert_close(plain, through_cfg, rtol=1e-4, atol=1e-5)  # uncond + 1 * (cond - uncond) rounds
    stronger = sample(net, cfg_scale=4.0, generators=gens(range(3)), **kw)
    assert (stronger - plain).abs().max() > 1e-3


def guided_as_model(net):
    """A model whose plain forward is the cfg_scale = 1 doubled-batch guidance of `net`."""
    wrapper = nn.Module()
    wrapper.forward = guided(net, 1.0, None, NUM_CLASSES)
    return wrapper.eval()


def test_sample_rejects_bad_input(net):
    kw = dict(
        sampler="ddpm",
        steps=5,
        shape=(2, C, H, W),
        y=torch.tensor([0, 1]),
        cfg_scale=1.5,
        cfg_channels=None,
        generators=gens([0, 1]),
        num_classes=NUM_CLASSES,
        device="cpu",
        **TRAINED,
    )
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(net, **{**kw, "sampler": "euler"})
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        sample(net, **{**kw, "generators": gens([0, 1, 2])})
    with pytest.raises(ValueError, match="null label"):
        sample(net, **{**kw, "y": torch.tensor([0, NUM_CLASSES])})
    with pytest.raises(ValueError, match="model.eval"):
        sample(net.train(), **kw)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver++"])
def test_steps_and_guidance_are_bounded(net, sampler):
    """Every sampler refuses more steps than trained timesteps (a request for 10^9 DPM-Solver++ steps would
    otherwise run 10^9 network calls) and a non-finite guidance scale (NaN passes `< 0`), before any sampling."""
    kw = dict(
        sampler=sampler,
        steps=5,
        shape=(2, C, H, W),
        y=torch.tensor([0, 1]),
        cfg_scale=1.5,
        cfg_channels=None,
        generators=gens([0, 1]),
        num_classes=NUM_CLASSES,
        device="cpu",
        **TRAINED,
    )
    assert max_steps(sampler, TRAINED["diffusion_steps"]) == 1000
    for steps in (0, 1001, 10**9):
        with pytest.raises(ValueError, match=rf"steps must be an integer in \[1, 1000\] for {sampler}"):
            sample(net, **{**kw, "steps": steps})
    for cfg_scale in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="finite cfg_scale"):
            sample(net, **{**kw, "cfg_scale": cfg_scale})


# ---------------------------------------------------------------------------------------------------------------
# A problem with a known answer: data ~ N(mu_y, s^2) per channel, with the exact optimal eps and variance


class GaussianOracle(nn.Module):
    """The Bayes-optimal network for x_0 ~ N(mu[y, c], s[c]^2) i.i.d. per element.

    eps* = E[eps | x_t]; v encodes the exact reverse variance Var[x_{t-1} | x_t] = beta-tilde_t + c1_t^2 Var[x_0 | x_t]
    of the (respaced) process `diffusion` in the learned range of Improved DDPM (v = 0 without a diffusion: the
    ODE solvers ignore it)."""

    def __init__(self, mu, s, diffusion=None):
        super().__init__()
        self.mu, self.s2, self.d = mu, s[None, :, None, None] ** 2, diffusion
        self.abar = torch.tensor(create_diffusion("").alphas_cumprod)
        if diffusion is not None:  # tables of the respaced process, indexed by the original timestep
            names = ("posterior_mean_coef1", "posterior_variance", "posterior_log_variance_clipped", "log_betas")
            self.tables = {n: torch.zeros(1000, dtype=torch.float64) for n in names}
            for n, table in self.tables.items():
                table[diffusion.timestep_map] = torch.tensor(getattr(diffusion, n))

    def forward(self, x, t, y):
        ab, m = self.abar[t].view(-1, 1, 1, 1), self.mu[y][:, :, None, None]
        denom = ab * self.s2 + 1 - ab  # Var[x_t] per channel
        eps = (1 - ab).sqrt() * (x.double() - ab.sqrt() * m) / denom
        if self.d is None:
            return torch.cat([eps, torch.zeros_like(eps)], dim=1).float()
        c1, post, lo, hi = (table[t].view(-1, 1, 1, 1) for table in self.tables.values())
        var_x0 = self.s2 * (1 - ab) / denom
        frac = ((post + c1**2 * var_x0).log() - lo) / (hi - lo).clamp(min=1e-12)
        v = (2 * frac - 1).clamp(-1, 1).expand_as(eps)
        return torch.cat([eps, v], dim=1).float()


def ddim_std_ratio(s, stride):
    """Final std / s of DDIM (eta = 0) on N(mu, s^2) data, derived independently: DDIM is Euler's method on the
    probability-flow ODE dy/dsigma = eps(y, sigma) in y = x_t / sqrt(abar), sigma = sqrt(1/abar - 1), and the exact
    eps = sigma (y - mu) / (s^2 + sigma^2) is linear in y, so the std of y follows the same recursion."""
    abar = create_diffusion("").alphas_cumprod
    sigmas = np.sqrt(1 / abar[list(range(0, 1000, stride))[::-1]] - 1).tolist() + [0.0]  # DDIM's steps, then x_0
    std = np.sqrt(s**2 + sigmas[0] ** 2)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        std = std * (1 + (sigma_next - sigma) * sigma / (s**2 + sigma**2))
    return std / s


@pytest.mark.parametrize("sampler,steps", [("ddpm", 250), ("ddim", 50), ("dpm-solver++", 25)])
def test_samplers_recover_a_known_gaussian(sampler, steps):
    """Samples of the exact model have the data's per-class means and per-channel stds.

    DDPM with the exact reverse variances is exact up to sampling error; DDIM-50 is first order and shrinks the
    std by a predictable amount (`ddim_std_ratio`, 3-8% here); DPM-Solver++ at 25 steps lands within a few percent."""
    mu = torch.tensor([[0.5, -0.3, 0.0, 1.0], [-0.8, 0.4, 0.2, -0.5]], dtype=torch.float64)  # (classes, C)
    s = torch.tensor([0.3, 0.5, 0.8, 1.0], dtype=torch.float64)
    respacing = {"ddpm": str(steps), "ddim": f"ddim{steps}"}.get(sampler)
    oracle = GaussianOracle(mu, s, respacing and create_diffusion(respacing)).eval()
    n = 128
    y = torch.arange(n) % 2
    x = sample(
        oracle,
        sampler=sampler,
        steps=steps,
        shape=(n, C, H, W),
        y=y,
        cfg_scale=1.0,
        cfg_channels=None,
        generators=gens(range(n)),
        num_classes=2,
        device="cpu",
        **TRAINED,
    ).double()
    expected_ratio = torch.tensor(ddim_std_ratio(s.numpy(), 1000 // steps)) if sampler == "ddim" else torch.ones(C)
    # DPM-Solver++ ends with a first-order jump to sigma = 0 from t = 40, which shrinks narrow data (s = 0.3) by ~9%
    std_tol = torch.tensor([0.12, 0.04, 0.04, 0.04]) if sampler == "dpm-solver++" else torch.full((C,), 0.03)
    for cls in (0, 1):
        xc = x[y == cls].transpose(0, 1).reshape(C, -1)  # (C, 64 * H * W) values per channel
        err_mean = (xc.mean(dim=1) - mu[cls]).abs()
        err_std = (xc.std(dim=1) / s - expected_ratio).abs()
        print(
            f"{sampler}-{steps} class {cls}: |mean - mu| {err_mean.numpy().round(3)}, "
            f"|std / s - expected| {err_std.numpy().round(3)}, expected {expected_ratio.numpy().round(3)}"
        )
        assert (err_mean < 0.05).all() and (err_std < std_tol).all()
