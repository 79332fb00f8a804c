"""Diffusion core, sampling side: DDPM / DDIM / DPM-Solver++(2M) on a Gaussian toy problem whose optimal
denoiser is known in closed form, parity with diffusers' schedulers, and classifier-free guidance."""

from __future__ import annotations

import math

import pytest
import torch
from diffusion_fixtures import F64
from diffusion_fixtures import _one_thread as _one_thread

from ldm.diffusion import (
    SAMPLERS,
    cfg_denoiser,
    concat_conditions,
    ddim,
    ddpm,
    dpmpp_2m,
    get_sampler,
    initial_noise,
    make_alphas_cumprod,
    model_denoiser,
    spaced_timesteps,
)
from ldm.diffusion.samplers import sampling_plan

# ----------------------------------------------------------------------------- samplers on a Gaussian toy
#
# Data x0 ~ N(MU, S^2) independently per dimension. Then x_t ~ N(a*MU, ab*S^2 + 1 - ab) and the optimal
# denoiser is the posterior mean E[x0 | x_t] = MU + a*S^2 / (ab*S^2 + 1 - ab) * (x_t - a*MU) (a = sqrt(ab)).
MU = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=F64)
S = torch.tensor([0.5, 1.0, 1.5, 0.8], dtype=F64)
AB = make_alphas_cumprod("linear")
N = 20_000


def gaussian_denoiser(alphas_cumprod: torch.Tensor = AB):
    def denoise(x_t, t):
        ab = alphas_cumprod.to(x_t.device)[t].to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
        return MU + ab.sqrt() * S**2 / (ab * S**2 + 1 - ab) * (x_t - ab.sqrt() * MU)

    return denoise


def exact_marginal(t: int, n: int, generator, alphas_cumprod: torch.Tensor = AB) -> torch.Tensor:
    """n draws of x_t from the forward process (so only the sampler's own error is measured)."""
    ab = alphas_cumprod[t]
    return ab.sqrt() * MU + (ab * S**2 + 1 - ab).sqrt() * torch.randn(n, 4, generator=generator, dtype=F64)


def affine_moments(name: str, steps: int, alphas_cumprod: torch.Tensor = AB, **opts):
    """Exact output mean and std of a deterministic sampler on the toy: with an affine denoiser the whole
    sampler is an affine map x_T -> x0 per dimension, so pushing the input mean m and m + sd through it
    gives the output mean and std without Monte-Carlo error."""
    ts, _ = sampling_plan(alphas_cumprod, steps)
    ab = alphas_cumprod[ts[0]]
    m, sd = ab.sqrt() * MU, (ab * S**2 + 1 - ab).sqrt()
    out = SAMPLERS[name](
        gaussian_denoiser(alphas_cumprod), torch.stack([m, m + sd]), alphas_cumprod, steps, None, **opts
    )
    return out[0], out[1] - out[0]


def w2(mean: torch.Tensor, std: torch.Tensor) -> float:
    """2-Wasserstein distance between N(mean, std^2) and N(MU, S^2) (diagonal Gaussians)."""
    return ((mean - MU).pow(2) + (std - S).pow(2)).sum().sqrt().item()


# Tolerances on |std/S - 1|: Monte-Carlo error 4/sqrt(2N) = 0.02 plus a discretisation budget. The dominant
# discretisation error is the last step: every sampler returns E[x0 | x_{t_min}] there (the step to clean data),
# whose std is S*sqrt(ab*S^2/(ab*S^2 + 1 - ab)) < S; with trailing spacing t_min = 1000/steps - 1
# (t=49 at 20 steps: -8% for S = 0.5, -2% for S = 1). Measured worst cases: ddpm-250 -2.5%, ddim-50 -6.2%,
# dpmpp_2m-20 -8.3%; budgets are those rounded up. The means are exact in expectation for all three samplers
# (each update is affine and the denoiser is the exact posterior mean), so they get Monte-Carlo error only:
# 5 standard errors, S/sqrt(N) per dimension.
@pytest.mark.parametrize(
    "name, steps, opts, budget",
    [
        ("ddpm", 250, {}, 0.04),
        ("ddim", 50, {}, 0.07),
        ("ddim", 50, {"eta": 1.0}, 0.11),
        ("dpmpp_2m", 20, {}, 0.09),
    ],
)
def test_samplers_recover_gaussian_toy(name, steps, opts, budget):
    g = torch.Generator().manual_seed(0)
    ts, _ = sampling_plan(AB, steps)
    out = SAMPLERS[name](gaussian_denoiser(), exact_marginal(int(ts[0]), N, g), AB, steps, g, **opts)
    assert out.shape == (N, 4) and out.dtype == F64
    assert ((out.mean(0) - MU).abs() < 5 * S / math.sqrt(N)).all(), (out.mean(0) - MU) / S
    err = (out.std(0) / S - 1).abs()
    assert (err < 4 / math.sqrt(2 * N) + budget).all(), err


def test_samplers_from_pure_noise_on_cosine_schedule():
    # The cosine schedule ends at ab ~ 2e-9, so N(0, I) is the exact start at t = 999; 20 DPM-Solver++ steps
    # land within 2% of the target std (exact moments, measured 1.3%) and 100 DDPM steps within MC + 4%.
    ab_cos = make_alphas_cumprod("cosine")
    g = torch.Generator().manual_seed(0)
    x = initial_noise((N, 4), g, "cpu", F64)
    out = ddpm(gaussian_denoiser(ab_cos), x, ab_cos, 100, g)
    assert ((out.mean(0) - MU).abs() < 5 * S / math.sqrt(N)).all()
    assert ((out.std(0) / S - 1).abs() < 0.02 + 0.04).all()
    mean, std = affine_moments("dpmpp_2m", 20, ab_cos)
    assert (mean - MU).abs().max() < 1e-4 and ((std / S - 1).abs() < 0.02).all(), std / S


def test_dpmpp_2m_beats_ddim_and_both_converge():
    ddim_w2 = {n: w2(*affine_moments("ddim", n)) for n in (10, 20, 50)}
    dpm_w2 = {n: w2(*affine_moments("dpmpp_2m", n)) for n in (10, 20, 50)}
    assert dpm_w2[20] < 0.6 * ddim_w2[20], (dpm_w2, ddim_w2)  # measured 0.05 vs 0.14
    assert dpm_w2[10] > dpm_w2[20] > dpm_w2[50] and ddim_w2[10] > ddim_w2[20] > ddim_w2[50]
    # deterministic samplers with one step return the denoised start: E[x0 | x_999]
    m, _ = affine_moments("ddim", 1)
    torch.testing.assert_close(m, MU)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m"])
def test_samplers_deterministic_given_generator(name):
    opts = {"eta": 0.5} if name == "ddim" else {}

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = initial_noise((8, 4), g)
        return SAMPLERS[name](gaussian_denoiser(), x, AB, 10, g, **opts)

    torch.manual_seed(0)
    a = run(1)
    torch.manual_seed(123)  # the global RNG must not matter
    b = run(1)
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.allclose(a, run(2))


def test_sampler_options_and_errors():
    g = torch.Generator().manual_seed(0)
    x = initial_noise((4, 4), g)
    calls = []
    out = ddim(gaussian_denoiser(), x, AB, 5, None, callback=lambda i, xi: calls.append((i, xi.shape)))
    assert calls == [(i, (4, 4)) for i in range(5)]
    explicit = ddim(gaussian_denoiser(), x, AB, 5, None, timesteps=[999, 799, 599, 399, 199])
    torch.testing.assert_close(out, explicit, rtol=0, atol=0)
    assert ddim(gaussian_denoiser(), x.bfloat16(), AB, 5, None).dtype == torch.bfloat16
    assert get_sampler("dpmpp_2m") is dpmpp_2m
    with pytest.raises(ValueError, match="torch.Generator"):
        ddpm(gaussian_denoiser(), x, AB, 5, None)
    with pytest.raises(ValueError, match="strictly decreasing"):
        ddim(gaussian_denoiser(), x, AB, 2, None, timesteps=[10, 500])
    with pytest.raises(ValueError, match="steps=len"):
        ddim(gaussian_denoiser(), x, AB, 3, None, timesteps=[500, 10])
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("euler")


def test_ddim_eta_one_equals_ddpm():
    # Song et al. 2021, Eq. 16: eta = 1 is the DDPM posterior; both draw one noise per noisy step
    x = initial_noise((64, 4), torch.Generator().manual_seed(0), dtype=F64)
    a = ddpm(gaussian_denoiser(), x, AB, 25, torch.Generator().manual_seed(5))
    b = ddim(gaussian_denoiser(), x, AB, 25, torch.Generator().manual_seed(5), eta=1.0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------- parity with diffusers


def _diffusers_loop(sched, x, generator=None, **step_kw):
    denoise = gaussian_denoiser()
    for t in sched.timesteps:
        x0 = denoise(x, t.expand(x.shape[0]))
        x = sched.step(x0, t, x, generator=generator, **step_kw).prev_sample
    return x


SCALED_LINEAR = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "sample",
}


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(eta):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(
        clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing", **SCALED_LINEAR
    )
    sched.alphas_cumprod = AB.clone()  # compare the update rule, not diffusers' float32 schedule
    sched.set_timesteps(50)
    x = initial_noise((256, 4), torch.Generator().manual_seed(0), dtype=F64)
    ref = _diffusers_loop(sched, x, torch.Generator().manual_seed(1), eta=eta)
    ours = ddim(gaussian_denoiser(), x, AB, 50, torch.Generator().manual_seed(1), eta=eta)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)


def test_ddpm_matches_diffusers():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        clip_sample=False, variance_type="fixed_small", timestep_spacing="trailing", **SCALED_LINEAR
    )
    sched.alphas_cumprod = AB.clone()
    sched.set_timesteps(100)
    x = initial_noise((256, 4), torch.Generator().manual_seed(0), dtype=F64)
    ref = _diffusers_loop(sched, x, torch.Generator().manual_seed(1))
    ours = ddpm(gaussian_denoiser(), x, AB, 100, torch.Generator().manual_seed(1))
    # diffusers also adds sqrt(1e-20) * noise on the final step (it clamps the zero variance at 1e-20)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-8)


def test_dpmpp_2m_matches_diffusers():
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        timestep_spacing="trailing",
        final_sigmas_type="zero",
        lower_order_final=True,
        **SCALED_LINEAR,
    )
    sched.alphas_cumprod = AB.clone()
    sched.set_timesteps(20)
    assert sched.timesteps.tolist() == spaced_timesteps(1000, 20).tolist()
    x = initial_noise((256, 4), torch.Generator().manual_seed(0), dtype=F64)
    ref = _diffusers_loop(sched, x)
    ours = dpmpp_2m(gaussian_denoiser(), x, AB, 20, None)
    # diffusers keeps its sigmas and the running sample in float32: agreement to float32 precision
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- guidance


def _toy_cond_model(calls: list):
    """Raw output = x_t * 0.5 + sum of the context per sample (so cond and uncond are distinguishable)."""

    def model_fn(x_t, t, cond):
        calls.append((x_t.shape[0], t.clone(), cond))
        shift = (cond["context"] * cond["context_mask"][..., None]).sum((1, 2))
        return 0.5 * x_t + shift.view(-1, 1)

    return model_fn


COND = {
    "context": torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]]),
    "context_mask": torch.tensor([[True, False], [True, True]]),
}
UNCOND = {"context": torch.zeros(2, 2, 1), "context_mask": torch.tensor([[True, False], [True, False]])}


def test_cfg_scale_one_is_the_conditional_model():
    calls: list = []
    x, t = torch.randn(2, 3), torch.tensor([10, 500])
    guided = cfg_denoiser(_toy_cond_model(calls), "eps", AB, COND, UNCOND, scale=1.0)(x, t)
    plain = model_denoiser(lambda x_, t_: _toy_cond_model([])(x_, t_, COND), "eps", AB)(x, t)
    torch.testing.assert_close(guided, plain)
    assert len(calls) == 1 and calls[0][0] == 2 and calls[0][2] is COND


def test_cfg_combination_by_hand_with_one_batched_call():
    calls: list = []
    x, t = torch.tensor([[1.0, -1.0], [0.0, 2.0]]), torch.tensor([7, 900])
    # x0 objective: the denoiser returns the guided raw output itself
    out = cfg_denoiser(_toy_cond_model(calls), "x0", AB, COND, UNCOND, scale=3.0)(x, t)
    cond_out = 0.5 * x + torch.tensor([[1.0], [7.0]])  # masked context sums: 1 and 3 + 4
    uncond_out = 0.5 * x
    torch.testing.assert_close(out, uncond_out + 3.0 * (cond_out - uncond_out))
    assert len(calls) == 1 and calls[0][0] == 4  # one call on [cond; uncond]
    assert calls[0][1].tolist() == [7, 900, 7, 900]
    assert (
        calls[0][2]["context"].shape == (4, 2, 1)
        and calls[0][2]["context_mask"][2:].tolist() == UNCOND["context_mask"].tolist()
    )


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_cfg_in_raw_space_equals_cfg_on_x0(objective):
    # the conversions are affine in the raw output, so guiding eps or v equals guiding the x0 estimates
    x, t = torch.randn(2, 3, dtype=F64), torch.tensor([3, 600])
    model = _toy_cond_model([])
    guided = cfg_denoiser(model, objective, AB, COND, UNCOND, scale=7.5)(x, t)
    x0_c = model_denoiser(lambda a, b: model(a, b, COND), objective, AB)(x, t)
    x0_u = model_denoiser(lambda a, b: model(a, b, UNCOND), objective, AB)(x, t)
    torch.testing.assert_close(guided, x0_u + 7.5 * (x0_c - x0_u))


def test_concat_conditions_layouts_and_errors():
    both = concat_conditions(
        {"a": torch.ones(2, 3), "m": None, "y": (torch.tensor([1, 2]),)},
        {"a": torch.zeros(2, 3), "m": None, "y": (torch.tensor([0, 0]),)},
    )
    assert both["a"].shape == (4, 3) and both["m"] is None and both["y"][0].tolist() == [1, 2, 0, 0]
    with pytest.raises(ValueError, match="keys"):
        concat_conditions({"a": torch.ones(1)}, {"b": torch.ones(1)})
    with pytest.raises(ValueError, match=r"cond\['context'\].*max_length"):
        concat_conditions({"context": torch.ones(1, 77, 8)}, {"context": torch.ones(1, 5, 8)})
    with pytest.raises(ValueError, match="cannot batch"):
        concat_conditions(torch.ones(1), None)
