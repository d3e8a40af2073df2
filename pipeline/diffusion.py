"""Gaussian diffusion with the semantics of the official DiT/ADM `diffusion/` package.

DDPM (Ho et al., 2020) with the learned-range variance and hybrid loss of Improved DDPM (Nichol & Dhariwal, 2021),
timestep respacing (ADM's `SpacedDiffusion`) and DDIM (Song et al., 2021). The network is a separate callable
`model(x_t, t, **model_kwargs) -> (N, 2C, H, W)` (eps, then the variance interpolation value v in [-1, 1]); this
module owns the schedule and calls it. `t` given to the methods is an index into this (possibly respaced) process;
the model always receives the original timestep `timestep_map[t]` in [0, diffusion_steps).

Per-sample determinism: the loops take `generators`, one CPU `torch.Generator` per batch row, and draw every noise
tensor of row i from generator i, so a sample does not depend on which batch it was drawn in (EDM's
StackedRandomGenerator idea). `sample(...)` is the one entry point of the sample stage and the served model: DDPM,
DDIM or DPM-Solver++ (through diffusers' scheduler), with classifier-free guidance.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

MEAN_TYPES = ("epsilon", "start_x")
VAR_TYPES = ("learned_range", "fixed_large", "fixed_small")
LOSS_TYPES = ("mse", "rescaled_mse", "rescaled_kl")


# ----------------------------------------------------------------------------------------------------------------
# Schedules and respacing


def linear_beta_range(num_steps: int) -> tuple[float, float]:
    """DDPM's linear betas, 1e-4 to 0.02 at T = 1000, scaled by 1000/T to keep the total noise the same for any T."""
    scale = 1000 / num_steps
    return scale * 0.0001, scale * 0.02


def named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """Betas (float64, (T,)) of the official schedules: "linear" (DDPM, scaled by 1000/T) or "squaredcos_cap_v2"."""
    if name == "linear":
        start, end = linear_beta_range(num_steps)
        return np.linspace(start, end, num_steps, dtype=np.float64)
    if name == "squaredcos_cap_v2":  # Improved DDPM eq. 17, s = 0.008, betas capped at 0.999

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = np.arange(num_steps, dtype=np.float64)
        betas = [1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps) for i in steps]
        return np.minimum(np.array(betas, dtype=np.float64), 0.999)
    raise ValueError(f"unknown noise_schedule {name!r}; use 'linear' or 'squaredcos_cap_v2'")


def space_timesteps(num_steps: int, section_counts: str | Sequence[int]) -> list[int]:
    """The original timesteps kept by a respacing, sorted (ADM's `space_timesteps`).

    "ddimN" takes a constant integer stride that yields exactly N steps (DDIM's spacing); "N" or "N1,N2,..." splits
    [0, T) into equal sections and takes evenly spaced steps, first and last included, in each.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == desired:
                    return list(range(0, num_steps, stride))
            raise ValueError(f"cannot take exactly {desired} DDIM steps of {num_steps} with an integer stride")
        section_counts = [int(c) for c in section_counts.split(",")]
    size_per, extra = divmod(num_steps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count == 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):  # accumulated, not j * stride: the float sums decide ADM's roundings (e.g. "21")
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


# ----------------------------------------------------------------------------------------------------------------
# Densities (in nats) used by the variational bound


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """log p(x) of a Gaussian integrated over the 8-bit bin of x in [-1, 1] (DDPM's decoder L_0), elementwise."""

    def cdf(v):  # the tanh approximation of the standard normal CDF, as in the official code
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

    centered, inv_std = x - means, torch.exp(-log_scales)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def randn_rows(
    shape: Sequence[int], generators: Sequence[torch.Generator] | None, device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal noise of `shape`; row i from `generators[i]` (drawn on the CPU in float32, then moved, so the
    values do not depend on the device or on the batch), or from the global RNG when `generators` is None."""
    if generators is None:
        return torch.randn(*shape, device=device, dtype=dtype)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}: pass one per row")
    rows = [torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# The process


class GaussianDiffusion:
    """A (respaced) Gaussian diffusion over `len(betas)` steps; `timestep_map[k]` is step k's original timestep."""

    def __init__(
        self,
        betas: np.ndarray,
        timestep_map: Sequence[int],
        mean_type: str,
        var_type: str,
        loss_type: str,
        original_num_steps: int,
    ):
        for value, allowed in ((mean_type, MEAN_TYPES), (var_type, VAR_TYPES), (loss_type, LOSS_TYPES)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) != len(timestep_map) or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1] with one entry per kept timestep")
        if len(betas) < 2:  # the clipped posterior log variance at t = 0 borrows the value at t = 1
            raise ValueError("a diffusion needs at least 2 timesteps; use more sampling steps")
        self.mean_type, self.var_type, self.loss_type = mean_type, var_type, loss_type
        self.original_num_steps, self.num_timesteps = original_num_steps, len(betas)
        self.timestep_map = torch.tensor(list(timestep_map), dtype=torch.long)
        self.betas, alphas = betas, 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0), DDPM eq. 6-7. The variance is 0 at t = 0, so its log is clipped to the t = 1 value.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        large = np.append(self.posterior_variance[1], betas[1:])  # fixed_large: beta_t, with a finite t = 0 value
        self.fixed_large_variance, self.fixed_large_log_variance = large, np.log(large)
        self._tables: dict = {}

    def _on(self, name: str, device) -> torch.Tensor:
        """The table `name` on `device`, copied once: a copy per step would also be a host sync per step."""
        key = (name, device)
        if key not in self._tables:
            self._tables[key] = torch.as_tensor(getattr(self, name)).to(device)
        return self._tables[key]

    def _extract(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """float32 (N, 1, ..., 1) values of the float64 table `name` at indices t, like ADM's _extract_into_tensor."""
        return self._on(name, t.device)[t].float().view(-1, *([1] * (ndim - 1)))

    # --- forward process ---------------------------------------------------------------------------------------

    def q_sample(self, x_start, t, noise=None):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.ndim) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.ndim) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        n = x_t.ndim
        mean = self._extract("posterior_mean_coef1", t, n) * x_start + self._extract("posterior_mean_coef2", t, n) * x_t
        return mean, self._extract("posterior_variance", t, n), self._extract("posterior_log_variance_clipped", t, n)

    # --- reverse process ---------------------------------------------------------------------------------------

    def _model_output(self, model: Callable, x, t, model_kwargs) -> torch.Tensor:
        """Run the model at the original timesteps; check the (N, 2C | C, ...) output layout."""
        out = model(x, self._on("timestep_map", t.device)[t], **(model_kwargs or {}))
        channels = x.shape[1] * (2 if self.var_type == "learned_range" else 1)
        if out.shape != (x.shape[0], channels, *x.shape[2:]):
            raise ValueError(
                f"the model returned {tuple(out.shape)} for x of {tuple(x.shape)}; expected "
                f"{channels} channels (var_type={self.var_type!r})"
            )
        return out.to(x.dtype)  # a bf16-autocast model output is upcast before the float32 diffusion math

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.ndim) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t - pred_xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t.ndim
        )

    def _p_from_output(self, out, x, t, clip_denoised, denoised_fn) -> dict:
        """p(x_{t-1} | x_t) from a model output: mean, variance, log_variance, pred_xstart."""
        n = x.ndim
        if self.var_type == "learned_range":  # Improved DDPM eq. 15: interpolate log beta-tilde_t .. log beta_t
            out, v = out.split(x.shape[1], dim=1)
            frac = (v + 1) / 2
            min_log = self._extract("posterior_log_variance_clipped", t, n)
            log_variance = frac * self._extract("log_betas", t, n) + (1 - frac) * min_log
        else:
            name = "fixed_large_log_variance" if self.var_type == "fixed_large" else "posterior_log_variance_clipped"
            log_variance = self._extract(name, t, n).expand_as(x)
        pred_xstart = out if self.mean_type == "start_x" else self._predict_xstart_from_eps(x, t, out)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
        }

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None) -> dict:
        out = self._model_output(model, x, t, model_kwargs)
        return self._p_from_output(out, x, t, clip_denoised, denoised_fn)

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, generators=None):
        """One ancestral step x_t -> x_{t-1} (no noise at t = 0)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = randn_rows(x.shape, generators, x.device, x.dtype)
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return {
            "sample": out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise,
            "pred_xstart": out["pred_xstart"],
        }

    def ddim_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0, generators=None
    ):
        """One DDIM step (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 is DDPM-like."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])  # re-derived, as for start_x models
        abar, abar_prev = self._extract("alphas_cumprod", t, x.ndim), self._extract("alphas_cumprod_prev", t, x.ndim)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
        noise = randn_rows(x.shape, generators, x.device, x.dtype)
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return {"sample": mean + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        generators=None,
    ) -> torch.Tensor:
        """Ancestral sampling from x_T ~ N(0, I) (or `noise`) down to x_0; returns (N, C, H, W)."""
        return self._loop(
            self.p_sample,
            model,
            shape,
            noise,
            device,
            progress,
            generators,
            dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs),
        )

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        generators=None,
    ) -> torch.Tensor:
        return self._loop(
            self.ddim_sample,
            model,
            shape,
            noise,
            device,
            progress,
            generators,
            dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs, eta=eta),
        )

    def _loop(self, step, model, shape, noise, device, progress, generators, step_kwargs) -> torch.Tensor:
        if device is None:
            device = noise.device if noise is not None else next(model.parameters()).device
        x = randn_rows(shape, generators, device) if noise is None else noise.to(device)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(x.shape)}, expected {tuple(shape)}")
        indices = range(self.num_timesteps - 1, -1, -1)
        for i in tqdm(indices, desc="sampling", disable=not progress):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                x = step(model, x, t, generators=generators, **step_kwargs)["sample"]
        return x

    # --- training ----------------------------------------------------------------------------------------------

    def _vb_terms_bpd(self, out, x_start, x_t, t) -> torch.Tensor:
        """The bound term L_{t-1} in bits per dim: KL to the true posterior at t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        p = self._p_from_output(out, x_t, t, clip_denoised=False, denoised_fn=None)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, p["mean"], 0.5 * p["log_variance"])
        return torch.where(t == 0, mean_flat(nll) / math.log(2.0), kl)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None) -> dict:
        """Per-example losses (N,): "loss", and for the hybrid objective also "mse" and "vb" (Improved DDPM)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise=noise)
        out = self._model_output(model, x_t, t, model_kwargs)
        if self.loss_type == "rescaled_kl":  # the pure bound, scaled to the sum over all T terms
            return {"loss": self._vb_terms_bpd(out, x_start, x_t, t) * self.num_timesteps}
        terms = {}
        if self.var_type == "learned_range":
            mean_out, v = out.split(x_start.shape[1], dim=1)
            # The bound trains only the variance; the mean is trained by the MSE alone (Improved DDPM, sec. 3.1).
            terms["vb"] = self._vb_terms_bpd(torch.cat([mean_out.detach(), v], dim=1), x_start, x_t, t)
            if self.loss_type == "rescaled_mse":  # ADM: "Divide by 1000 for equivalence with initial implementation"
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
            out = mean_out
        target = x_start if self.mean_type == "start_x" else noise
        terms["mse"] = mean_flat((target - out) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


# The training diffusion of the paper and the official train.py (create_diffusion(timestep_respacing="")); with the
# model's learn_sigma it is what a model card records under `diffusion`.
DIT_DIFFUSION = {"noise_schedule": "linear", "diffusion_steps": 1000}


def create_diffusion(
    timestep_respacing,
    noise_schedule="linear",
    use_kl=False,
    sigma_small=False,
    predict_xstart=False,
    learn_sigma=True,
    rescale_learned_sigmas=False,
    diffusion_steps=1000,
) -> GaussianDiffusion:
    """The official `create_diffusion`: "" or None = all steps, "250" / "10,15,20" = ADM respacing, "ddim50" = DDIM.

    Respacing keeps the alphas_cumprod of the kept steps and recomputes betas from them (ADM's SpacedDiffusion).
    """
    base_betas = named_beta_schedule(noise_schedule, diffusion_steps)
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    kept = space_timesteps(diffusion_steps, timestep_respacing)
    alphas_cumprod = np.cumprod(1.0 - base_betas)[kept]
    betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
    loss_type = "rescaled_kl" if use_kl else "rescaled_mse" if rescale_learned_sigmas else "mse"
    var_type = "learned_range" if learn_sigma else "fixed_small" if sigma_small else "fixed_large"
    return GaussianDiffusion(
        betas,
        kept,
        mean_type="start_x" if predict_xstart else "epsilon",
        var_type=var_type,
        loss_type=loss_type,
        original_num_steps=diffusion_steps,
    )


# ----------------------------------------------------------------------------------------------------------------
# Sampling entry point

SAMPLERS = ("ddpm", "ddim", "dpm-solver++")


def max_steps(sampler: str, diffusion_steps: int) -> int:
    """The most sampling steps `sampler` can take on a model trained with `diffusion_steps` timesteps.

    DDPM and DDIM respace the trained timesteps (ADM's `space_timesteps`), so they can visit each at most once.
    DPM-Solver++ could be asked for more, but the eps-network was only trained at those integer timesteps: diffusers
    would round a finer grid onto them, repeating timesteps (zero-length steps) at the cost of a full network call
    each. The bound is the same for all three: one step per trained timestep.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; use one of {SAMPLERS}")
    return diffusion_steps


def dpm_solver_scheduler(noise_schedule: str, diffusion_steps: int):
    """diffusers' DPM-Solver++(2M) (Lu et al., 2022) on the same betas as `create_diffusion`, predicting eps."""
    from diffusers import DPMSolverMultistepScheduler  # only this sampler needs diffusers

    if noise_schedule == "linear":
        start, end = linear_beta_range(diffusion_steps)
        betas = dict(beta_schedule="linear", beta_start=start, beta_end=end)
    else:
        named_beta_schedule(noise_schedule, diffusion_steps)  # rejects an unknown name with the list of known ones
        betas = dict(beta_schedule=noise_schedule)  # diffusers' squaredcos_cap_v2 is Improved DDPM's, as ours
    return DPMSolverMultistepScheduler(
        num_train_timesteps=diffusion_steps,
        algorithm_type="dpmsolver++",
        prediction_type="epsilon",
        solver_order=2,
        **betas,
    )


def dpm_solver_sample_loop(
    model, shape, steps: int, scheduler, noise: torch.Tensor, model_kwargs=None, progress=False
) -> torch.Tensor:
    """Integrate from `noise` to x_0 with `scheduler` (see `dpm_solver_scheduler`) in `steps` model calls.

    The scheduler gets eps = out[:, :C] sliced here: its own learned-range handling keeps only 3 channels.
    """
    scheduler.set_timesteps(steps, device=noise.device)
    x, channels = noise * scheduler.init_noise_sigma, noise.shape[1]
    for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress):
        with torch.no_grad():
            out = model(x, t.expand(shape[0]), **(model_kwargs or {}))
        x = scheduler.step(out[:, :channels].float(), t, x).prev_sample  # fp32 eps keeps x in fp32 under autocast
    return x


def guided(model, cfg_scale: float, cfg_channels: int | None, num_classes: int) -> Callable:
    """The conditional half of the official doubled-batch classifier-free guidance, as a model `f(x, t, y)`.

    The official sampler runs the batch [x; x] with labels [y; null] through `forward_with_cfg` and keeps the first
    half; `forward_with_cfg` only reads the first half of x, so carrying the second half along changes nothing.
    """

    def forward(x, t, y):
        y_null = torch.full_like(y, num_classes)  # the null label is `num_classes` (label dropout's id)
        out = model.forward_with_cfg(
            torch.cat([x, x]),
            torch.cat([t, t]),
            y=torch.cat([y, y_null]),
            cfg_scale=cfg_scale,
            cfg_channels=cfg_channels,
        )
        return out[: x.shape[0]]

    return forward


def sample(
    model,
    *,
    sampler: str,
    steps: int,
    shape: Sequence[int],
    y: torch.Tensor,
    cfg_scale: float,
    cfg_channels: int | None,
    generators: Sequence[torch.Generator] | None,
    num_classes: int,
    device,
    noise_schedule: str,
    diffusion_steps: int,
    learn_sigma: bool,
    progress=False,
) -> torch.Tensor:
    """Class-conditional samples (N, C, H, W) in model space (still scaled by the VAE's scaling factor).

    sampler: "ddpm" (ADM respacing to `steps`, clip_denoised=False: the official protocol), "ddim" (eta = 0) or
    "dpm-solver++". y: (N,) labels in [0, num_classes). cfg_scale != 1 uses guidance with the null label
    `num_classes`; cfg_channels guides only the first channels (3 = the official sampler, None = all eps channels).
    generators: one CPU generator per row (all of row i's noise comes from generators[i]) or None (global RNG).
    noise_schedule, diffusion_steps, learn_sigma: the diffusion the model was trained with (its model card).
    """
    _check_sample_args(model, sampler, steps, shape, y, cfg_scale, cfg_channels, num_classes, diffusion_steps)
    net = model if cfg_scale == 1.0 else guided(model, cfg_scale, cfg_channels, num_classes)
    model_kwargs = {"y": y.to(device)}
    noise = randn_rows(shape, generators, device)
    if sampler == "dpm-solver++":
        scheduler = dpm_solver_scheduler(noise_schedule, diffusion_steps)
        return dpm_solver_sample_loop(net, shape, steps, scheduler, noise, model_kwargs, progress)
    respacing = str(steps) if sampler == "ddpm" else f"ddim{steps}"
    diffusion = create_diffusion(
        respacing, noise_schedule=noise_schedule, diffusion_steps=diffusion_steps, learn_sigma=learn_sigma
    )
    loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
    return loop(
        net,
        shape,
        noise=noise,
        clip_denoised=False,
        model_kwargs=model_kwargs,
        device=device,
        progress=progress,
        generators=generators,
    )


def _check_sample_args(model, sampler, steps, shape, y, cfg_scale, cfg_channels, num_classes, diffusion_steps) -> None:
    limit = max_steps(sampler, diffusion_steps)
    if not isinstance(steps, int) or not 1 <= steps <= limit:
        raise ValueError(
            f"steps must be an integer in [1, {limit}] for {sampler} on a {diffusion_steps}-step "
            f"diffusion, got {steps!r}"
        )
    if len(shape) != 4 or y.shape != (shape[0],):
        raise ValueError(f"shape must be (N, C, H, W) and y of shape (N,); got {tuple(shape)} and {tuple(y.shape)}")
    if y.numel() and not (0 <= int(y.min()) and int(y.max()) < num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); id {num_classes} is the null label")
    bad_channels = cfg_channels is not None and not 1 <= cfg_channels <= shape[1]
    if not math.isfinite(cfg_scale) or cfg_scale < 0 or bad_channels:
        raise ValueError(f"need a finite cfg_scale >= 0 and cfg_channels in [1, {shape[1]}] or None")
    if cfg_scale != 1.0 and not hasattr(model, "forward_with_cfg"):
        raise ValueError("cfg_scale != 1 needs a model with forward_with_cfg(x, t, y, cfg_scale, cfg_channels)")
    if getattr(model, "training", False):
        raise ValueError("the model is in training mode (labels would be dropped at random): call model.eval()")
