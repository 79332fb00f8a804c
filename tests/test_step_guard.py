"""The bad-step guard (``ldm.lit.guard.StepGuard``) decides on the device or on the host with the same result.

With a fused optimizer (AdamW on CUDA by default; here ``fused=True`` on CPU, the same ``found_inf`` mechanism) the
decision never reaches the host during the step: the fused kernel skips the update, the EMA is weighted by the
decision, and the counter is read one step later. These tests run both ways side by side on the same gradients,
NaN included, and check weights, EMA, optimizer state, counters and the stop after a streak; and that a fused
optimizer under 16-mixed is clipped in true gradient units.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ldm.lit.guard import NonFiniteTrainingError, StepGuard
from ldm.models.ema import ema_decay_at, ema_update


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.SiLU(), nn.Linear(16, 3))


class Run:
    """Model + EMA + fused AdamW + guard: the optimisation part of a training step, as the modules do it."""

    def __init__(self, defer: bool, max_consecutive: int = 20) -> None:
        self.model = _model()
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
        self.guard = StepGuard(max_consecutive, defer=defer)

    def step(self, step: int, x: torch.Tensor, nan: bool) -> None:
        self.guard.begin_step(self.model)
        loss = self.model(x).square().mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if nan:
            self.model[0].weight.grad[0, 0] = float("nan")
        self.guard.check(self.opt, clip=0.5)
        self.opt.step()
        ema_update(self.ema, self.model, ema_decay_at(step, 0.99), applied=self.guard.last_applied)
        self.guard.end_step(step)


def test_device_side_decision_equals_the_host_side_one():
    deferred, host = Run(defer=True), Run(defer=False)
    bad = {2, 3, 6}
    gen = torch.Generator().manual_seed(1)
    for step in range(8):
        x = torch.randn(8, 6, generator=gen)
        before = {k: v.clone() for k, v in deferred.model.state_dict().items()}
        deferred.step(step, x, step in bad)
        host.step(step, x, step in bad)
        assert isinstance(deferred.guard.last_applied, torch.Tensor)  # the decision stayed a tensor
        assert host.guard.last_applied is (step not in bad)
        if step in bad:  # nothing moved: weights, BatchNorm statistics
            for k, v in deferred.model.state_dict().items():
                assert torch.equal(v, before[k]), (step, k)
        for (k, a), b in zip(deferred.model.state_dict().items(), host.model.state_dict().values(), strict=True):
            assert torch.equal(a, b), (step, k)
        for a, b in zip(deferred.ema.parameters(), host.ema.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # a fused multiply-add's rounding at most
        # read one step late: the host counter does not know about this step yet
        assert deferred.guard.total == len([s for s in bad if s < step])
        assert host.guard.total == len([s for s in bad if s <= step])
    for p, q in zip(deferred.model.parameters(), host.model.parameters(), strict=True):
        # Adam's step counts only the applied updates
        assert deferred.opt.state[p]["step"].item() == host.opt.state[q]["step"].item() == 8 - len(bad)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(deferred.opt.state[p][key], host.opt.state[q][key])
    assert not hasattr(deferred.opt, "found_inf")  # removed after each step
    assert deferred.guard.state_dict() == host.guard.state_dict() == {"total": 3, "in_a_row": 0}


def test_device_side_streak_stops_the_run_one_step_late():
    run = Run(defer=True, max_consecutive=3)
    x = torch.randn(8, 6)
    run.step(0, x, nan=False)
    for step in (1, 2, 3):
        run.step(step, x, nan=True)
    assert run.guard.in_a_row == 2  # step 3's decision is not read yet
    with pytest.raises(NonFiniteTrainingError, match="3 steps in a row up to step 3"):
        run.step(4, x, nan=True)
    # and at the end of training a pending streak is read too
    run = Run(defer=True, max_consecutive=2)
    run.step(0, x, nan=True)
    run.step(1, x, nan=True)
    with pytest.raises(NonFiniteTrainingError, match="2 steps in a row up to step 1"):
        run.guard.finish()


def test_a_fused_optimizer_under_16_mixed_is_clipped_in_true_gradient_units():
    """Lightning leaves the gradients of an optimizer that unscales inside its step scaled; the guard unscales them
    first, so the clip threshold means what it says, and the scaler's step does not unscale twice."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    a, b = _model(), _model()
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, fused=True)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, fused=True)
    x = torch.randn(8, 6)
    scaler.scale(a(x).square().mean()).backward()
    guard = StepGuard()
    guard.check(opt_a, clip=0.05, scaler=scaler)
    assert guard.last_applied is True  # the scaler decides itself: host path
    b(x).square().mean().backward()
    torch.nn.utils.clip_grad_norm_(b.parameters(), 0.05)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in a.parameters()]))
    assert norm.item() == pytest.approx(0.05, rel=1e-4)
    scaler.step(opt_a)
    opt_b.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_device_weighted_ema_equals_the_lerp():
    torch.manual_seed(0)
    model, ema_a = nn.Linear(40, 30), nn.Linear(40, 30)
    ema_b = copy.deepcopy(ema_a)
    ema_update(ema_a, model, 0.9)
    ema_update(ema_b, model, 0.9, applied=torch.tensor(True))
    for p, q in zip(ema_a.parameters(), ema_b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    before = [p.clone() for p in ema_b.parameters()]
    ema_update(ema_b, model, 0.9, applied=torch.tensor(False))
    assert all(torch.equal(p, q) for p, q in zip(ema_b.parameters(), before, strict=True))
