"""Diffusion core, training side: noise schedules and timestep spacing (against diffusers' schedulers), the
eps / v / x0 objectives and their loss weights, offset noise, and DiffusionLoss, on hand-computed values."""

from __future__ import annotations

import pytest
import torch
from diffusion_fixtures import F64
from diffusion_fixtures import _one_thread as _one_thread
from torch import nn

from ldm.diffusion import (
    loss_weight,
    make_alphas_cumprod,
    make_betas,
    q_sample,
    sample_noise,
    snr,
    spaced_timesteps,
    to_eps,
    to_v,
    to_x0,
    training_target,
)
from ldm.losses.diffusion import DiffusionLoss

# ----------------------------------------------------------------------------------------------- schedules


def test_paper_linear_schedule_endpoints_and_monotone():
    betas = make_betas("linear")
    assert betas.dtype == F64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(0.00085, abs=1e-15)
    assert betas[-1].item() == pytest.approx(0.012, abs=1e-15)
    # sqrt-space linear: the square roots are equally spaced
    assert torch.allclose(betas.sqrt().diff(), betas.sqrt().diff()[0].expand(999), atol=1e-15)
    plain = make_betas("linear_plain")
    assert (plain[0].item(), plain[-1].item()) == pytest.approx((1e-4, 2e-2), abs=1e-15)
    for name in ("linear", "cosine", "linear_plain"):
        ab = make_alphas_cumprod(name)
        assert ab.dtype == F64 and bool((ab.diff() < 0).all()) and 0 < ab[-1] < ab[0] < 1
    assert make_betas("cosine").max().item() == pytest.approx(0.999)  # the clip of Nichol & Dhariwal


@pytest.mark.parametrize(
    "name, diffusers_name, kw",
    [
        ("linear", "scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
        ("cosine", "squaredcos_cap_v2", {}),
        ("linear_plain", "linear", {"beta_start": 1e-4, "beta_end": 2e-2}),
    ],
)
def test_schedules_match_diffusers(name, diffusers_name, kw):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name, **kw).alphas_cumprod.to(F64)
    ours = make_alphas_cumprod(name, 1000)
    # diffusers accumulates the product in float32: ~1000 roundings of 6e-8 -> relative error up to ~2e-5
    # (measured 1.3e-5 for the cosine tail where ab ~ 2e-9).
    torch.testing.assert_close(ours, ref, rtol=3e-5, atol=1e-8)


def test_snr_by_hand():
    ab = torch.tensor([0.5, 0.8, 0.2], dtype=F64)
    torch.testing.assert_close(snr(ab), torch.tensor([1.0, 4.0, 0.25], dtype=F64))


@pytest.mark.parametrize("steps", [1, 3, 10, 20, 50, 250, 1000])
@pytest.mark.parametrize("spacing, offset", [("trailing", 0), ("leading", 1), ("linspace", 0)])
def test_spaced_timesteps_match_diffusers_ddim(steps, spacing, offset):
    from diffusers import DDIMScheduler

    if spacing == "linspace" and steps == 1:
        assert spaced_timesteps(1000, 1, "linspace").tolist() == [
            999
        ]  # ours starts from noise; diffusers: [0]
        return
    if spacing == "leading" and steps == 1000:  # 1..1000: diffusers builds an out-of-range timestep
        with pytest.raises(ValueError, match="smaller offset"):
            spaced_timesteps(1000, steps, spacing, offset=offset)
        return
    ref = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(steps)
    ours = spaced_timesteps(1000, steps, spacing, offset=offset)
    assert ours.dtype == torch.int64
    assert ours.tolist() == ref.timesteps.tolist()


def test_spaced_timesteps_defaults_start_from_noise():
    assert spaced_timesteps(1000, 50).tolist()[:3] == [999, 979, 959]  # trailing is the default
    assert spaced_timesteps(1000, 50)[-1].item() == 19
    assert spaced_timesteps(1000, 7)[0].item() == 999
    with pytest.raises(ValueError, match="steps must be in"):
        spaced_timesteps(1000, 0)
    with pytest.raises(ValueError, match="spacing"):
        spaced_timesteps(1000, 10, "uniform")


# ---------------------------------------------------------------------------------------------- objectives


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-12), (torch.float32, 1e-6)])
def test_objective_round_trips(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 3, 4, 4, generator=g, dtype=dtype)
    eps = torch.randn(64, 3, 4, 4, generator=g, dtype=dtype)
    ab = torch.linspace(0.05, 0.995, 64, dtype=F64)
    x_t = q_sample(x0, eps, ab)
    a, s = ab.sqrt().view(-1, 1, 1, 1), (1 - ab).sqrt().view(-1, 1, 1, 1)
    v = a * eps - s * x0  # Salimans & Ho 2022, Sec. 4
    torch.testing.assert_close(training_target("v", x0, eps, ab), v.to(dtype), rtol=0, atol=tol)
    for objective, out in (("eps", eps), ("v", v), ("x0", x0)):
        out = training_target(objective, x0, eps, ab)
        torch.testing.assert_close(to_x0(objective, x_t, out, ab), x0, rtol=0, atol=tol * 10)
        torch.testing.assert_close(to_eps(objective, x_t, out, ab), eps, rtol=0, atol=tol * 10)
        torch.testing.assert_close(to_v(objective, x_t, out, ab), v.to(dtype), rtol=0, atol=tol * 10)


def test_objectives_reject_unknown_names():
    with pytest.raises(ValueError, match="'eps', 'v', 'x0'"):
        to_x0("epsilon", torch.zeros(1), torch.zeros(1), torch.tensor(0.5))


def test_min_snr_weights_by_hand():
    snr_ = torch.tensor([0.5, 5.0, 20.0])
    # gamma = 5: min(snr, 5) = [0.5, 5, 5]
    torch.testing.assert_close(loss_weight("eps", snr_, "min_snr", 5.0), torch.tensor([1.0, 1.0, 0.25]))
    torch.testing.assert_close(
        loss_weight("v", snr_, "min_snr", 5.0), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21])
    )
    torch.testing.assert_close(loss_weight("x0", snr_, "min_snr", 5.0), torch.tensor([0.5, 5.0, 5.0]))
    for objective in ("eps", "v", "x0"):
        assert loss_weight(objective, snr_, "uniform").tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="weighting"):
        loss_weight("eps", snr_, "p2")


def test_offset_noise_adds_per_sample_per_channel_variance():
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(512, 4, 8, 8)
    plain, offset = sample_noise(x0, g), sample_noise(x0, g, offset=0.5)
    # variance of the spatial mean of each (sample, channel): 1/64 without offset, 1/64 + 0.5^2 with it;
    # 2048 (sample, channel) pairs -> relative standard error of a variance ~ sqrt(2/2048) = 3%
    assert plain.mean((2, 3)).var().item() == pytest.approx(1 / 64, rel=0.15)
    assert offset.mean((2, 3)).var().item() == pytest.approx(1 / 64 + 0.25, rel=0.15)
    assert offset.var().item() == pytest.approx(1.25, rel=0.1)


# -------------------------------------------------------------------------------------------- DiffusionLoss


def _oracle(loss_fn: DiffusionLoss, x0: torch.Tensor, objective: str, seen: dict):
    """A model that knows x0 and so outputs the exact target (recovering eps from x_t)."""

    def model_fn(x_t, t):
        ab = loss_fn.alphas_cumprod[t]
        eps = to_eps("x0", x_t, x0, ab)
        seen.update(x_t=x_t, t=t)
        return training_target(objective, x0, eps, ab)

    return model_fn


@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
def test_diffusion_loss_by_hand(objective, weighting):
    loss_fn = DiffusionLoss(objective=objective, weighting=weighting, min_snr_gamma=5.0)
    x0 = torch.randn(16, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    seen: dict = {}
    loss, logs = loss_fn(_oracle(loss_fn, x0, objective, seen), x0, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-10 and logs["loss_uniform"].item() < 1e-10  # the true target costs nothing

    # A zero output costs weight(t) * mean(target^2) per sample; recompute it from the t and x_t it was given.
    def zero_model(x_t, t):
        seen.update(x_t=x_t, t=t)
        return torch.zeros_like(x_t)

    loss, logs = loss_fn(zero_model, x0, torch.Generator().manual_seed(0))
    ab = make_alphas_cumprod("linear")[seen["t"]].view(-1, 1, 1, 1)
    eps = (seen["x_t"].double() - ab.sqrt() * x0.double()) / (1 - ab).sqrt()
    target = {"eps": eps, "x0": x0.double(), "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0.double()}[objective]
    per_sample = target.pow(2).mean((1, 2, 3))
    s = (ab / (1 - ab)).flatten()
    min_snr = {"eps": s.clamp(max=5) / s, "v": s.clamp(max=5) / (s + 1), "x0": s.clamp(max=5)}[objective]
    expected = (min_snr if weighting == "min_snr" else 1.0) * per_sample
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-5)
    assert logs["loss_uniform"].item() == pytest.approx(per_sample.mean().item(), rel=1e-5)
    assert not logs["loss"].requires_grad and loss.dtype == torch.float32


def test_diffusion_loss_x0_objective_constant_input():
    # target = x0 whatever t and the noise are: a zero model on x0 = 2 costs exactly 4
    loss, _ = DiffusionLoss(objective="x0")(lambda x, t: torch.zeros_like(x), torch.full((8, 3), 2.0))
    assert loss.item() == pytest.approx(4.0)


def test_diffusion_loss_samples_t_uniformly_and_is_deterministic():
    loss_fn = DiffusionLoss(num_timesteps=10)
    ts = []
    x0 = torch.randn(4000, 2)
    loss_fn(lambda x, t: ts.append(t) or torch.zeros_like(x), x0, torch.Generator().manual_seed(0))
    counts = torch.bincount(ts[0], minlength=10)
    assert counts.shape == (10,) and counts.min() > 330 and counts.max() < 470  # 400 +- 5 sigma (sigma = 19)
    a = loss_fn(lambda x, t: x, x0, torch.Generator().manual_seed(3))[0]
    b = loss_fn(lambda x, t: x, x0, torch.Generator().manual_seed(3))[0]
    c = loss_fn(lambda x, t: x, x0, torch.Generator().manual_seed(4))[0]
    assert a.item() == b.item() != c.item()


def test_diffusion_loss_under_bf16_autocast_and_dtype_casts():
    net = nn.Conv2d(4, 4, 3, padding=1)
    loss_fn = DiffusionLoss(objective="v", weighting="min_snr", offset_noise=0.1)
    x0 = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref, _ = loss_fn(lambda x, t: net(x), x0, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = loss_fn(lambda x, t: net(x), x0, torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref.item(), rel=0.03)  # bf16 conv: ~3 significant digits
    loss.backward()
    assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all()
    # the schedule stays float64 through module dtype casts, and is not part of the state dict
    loss_fn.to(torch.bfloat16)
    assert loss_fn.alphas_cumprod.dtype == F64
    torch.testing.assert_close(loss_fn.alphas_cumprod, make_alphas_cumprod("linear"), rtol=0, atol=0)
    assert "alphas_cumprod" not in loss_fn.state_dict()


def test_diffusion_loss_errors():
    with pytest.raises(ValueError, match="out_channels"):
        DiffusionLoss()(lambda x, t: x[:, :1], torch.zeros(2, 4, 2, 2))
    with pytest.raises(ValueError, match="objective"):
        DiffusionLoss(objective="score")
    with pytest.raises(ValueError, match="schedule"):
        DiffusionLoss(schedule="sigmoid")
