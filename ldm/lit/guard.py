"""The bad-step guard: an optimizer update whose gradients are not finite is not applied.

``StepGuard`` decides per update (on the device without a host sync where the optimizer allows, else on the
host), clips, keeps BatchNorm statistics of skipped updates out of the weights, counts skipped steps
(``train/skipped_steps``) and stops the run with ``NonFiniteTrainingError`` after ``max_consecutive`` bad steps in
a row. ``poison_if_not_finite`` makes a non-finite loss give non-finite gradients, so one test catches both.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

log = logging.getLogger("ldm.train")


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer steps in a row had non-finite gradients (or loss)."""

    def __init__(self, step: int, in_a_row: int, total: int) -> None:
        self.step, self.in_a_row, self.total = step, in_a_row, total
        super().__init__(f"{in_a_row} steps in a row up to step {step} had a non-finite loss or gradients "
                         f"({total} skipped in all); none of them was applied")


def poison_if_not_finite(loss: Tensor) -> Tensor:
    """``loss`` unchanged when finite; else a loss whose gradients are NaN everywhere.

    An infinite loss can still have finite gradients; making them NaN lets one test (the gradient norm, which
    DDP has already all-reduced, so every rank decides alike) catch both without another collective.
    The multiplier is detached and exactly 1.0 for a finite loss, so healthy steps are bit-for-bit unchanged.
    """
    ok = torch.isfinite(loss.detach())
    return loss * torch.where(ok, torch.ones_like(loss), torch.full_like(loss, float("nan"))).detach()


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class StepGuard:
    """Decides, per optimizer update, whether its (unscaled, all-reduced) gradients are finite; clips them.

    ``check`` is called right before ``optimizer.step`` (Lightning's ``on_before_optimizer_step``) and skips the
    update when the gradient norm is not finite: no moment, step-count or weight-decay update. ``end_step`` closes
    a training step; after ``max_consecutive`` bad steps in a row (0: never) the run stops with
    ``NonFiniteTrainingError``. With a GAN (stage 1) each optimizer's update is decided on its own: the generator
    steps before the discriminator's loss exists (as the AMP scaler requires), so a bad discriminator update cannot
    take back a good generator update; the step counts as bad when any of its updates was skipped.

    Two ways to skip, with the same result:

    - *on the device, no host sync* (a fused optimizer, e.g. AdamW on CUDA, without an AMP grad scaler): the
      decision stays a GPU tensor handed to the fused kernel as ``found_inf`` (the mechanism ``GradScaler`` uses),
      the EMA update waits for it (stage 2, ``applied_at``) or is weighted by it (stage 1), and the host reads it
      one step later (a non-blocking copy), so the counter, the warning and the stop come one step late and a step
      never waits for the GPU.
    - *on the host* (any other optimizer, or 16-mixed, whose scaler decides itself): ``bool(isfinite(norm))``,
      one sync per update, and the gradients of a bad update are set to ``None``.

    Forward passes in training mode also change state outside the optimizer: BatchNorm running statistics (the
    PatchGAN's). ``begin_step`` keeps a copy of those buffers and ``end_step`` puts back those of modules whose
    update was skipped, so a skipped update leaves no trace in the weights a checkpoint holds.
    """

    def __init__(self, max_consecutive: int = 20, defer: bool = True) -> None:
        self.max_consecutive = int(max_consecutive)
        self.defer = defer  # allow the device-side decision where the optimizer supports it
        self.total = 0  # bad steps in the whole run (restored on resume)
        self.in_a_row = 0
        self.last_applied: bool | Tensor = True  # the latest update was applied (a device bool when deferred)
        self._buffers: list[tuple[set[int], list[tuple[Tensor, Tensor]]]] | None = None
        self._decisions: list[tuple[set[int], bool | Tensor]] = []  # (parameter ids, applied) of this step
        self._pending: list[tuple[int, Tensor, Any]] = []  # (step, bad flag on the host, copy-done event)
        self._last_bad = -1  # step of the latest skipped update

    def begin_step(self, module: torch.nn.Module) -> None:
        """Call before the first forward pass of a training step (once per accumulation window)."""
        if self._buffers is None:
            self._buffers = [({id(p) for p in m.parameters()}, [(b, b.detach().clone()) for b in m.buffers()])
                             for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def check(self, optimizer: torch.optim.Optimizer, clip: float | None, scaler: Any = None) -> None:
        """Clip and decide one update. ``scaler``: the AMP ``GradScaler`` of 16-mixed training, if any."""
        params = [p for p in optimizer_params(optimizer) if p.grad is not None]
        if not params:
            self.last_applied = True
            return
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # a fused optimizer unscales inside its step, so Lightning leaves the gradients scaled: unscale them
            # here, or the clip threshold would be in loss-scaled units (the scaler's step then knows)
            scaler.unscale_(optimizer)
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(params, float(clip), foreach=True)
        else:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))
        applied: bool | Tensor
        if self._can_defer(optimizer, scaler):
            applied = torch.isfinite(norm)
            self._hook(optimizer)
            optimizer.found_inf = (~applied).to(torch.float32)  # read (and removed) by the fused step
        else:
            applied = bool(torch.isfinite(norm))  # the one host sync of this path
            if not applied:
                for p in params:
                    p.grad = None
        self._decisions.append(({id(p) for p in params}, applied))
        self.last_applied = applied

    def _can_defer(self, optimizer: torch.optim.Optimizer, scaler: Any) -> bool:
        return (self.defer and scaler is None and bool(optimizer.defaults.get("fused"))
                and getattr(optimizer, "_step_supports_amp_scaling", False))

    @staticmethod
    def _hook(optimizer: torch.optim.Optimizer) -> None:
        if not getattr(optimizer, "_ldm_found_inf_hook", False):  # once per optimizer: remove it after each step
            optimizer.register_step_post_hook(lambda opt, args, kwargs: opt.__dict__.pop("found_inf", None))
            optimizer._ldm_found_inf_hook = True

    def end_step(self, step: int) -> None:
        buffers, self._buffers = self._buffers or [], None
        decisions, self._decisions = self._decisions, []
        with torch.no_grad():
            for owners, saved in buffers:  # BatchNorm statistics of modules whose update was skipped go back
                mine = [applied for ids, applied in decisions if ids & owners]
                if not mine:
                    continue
                keep = _all(mine)
                for live, copy in saved:
                    if isinstance(keep, Tensor):
                        live.copy_(torch.where(keep, live, copy))
                    elif not keep:
                        live.copy_(copy)
        applied = _all([applied for _, applied in decisions])
        if isinstance(applied, Tensor):  # read on the host one step later, without waiting now
            bad = (~applied).to("cpu", non_blocking=True) if applied.is_cuda else ~applied
            event = torch.cuda.Event() if applied.is_cuda else None
            if event is not None:
                event.record()
            self._pending.append((step, bad, event))
            self._settle(keep_newest=True)
        else:
            self._settle(keep_newest=False)
            self._count(step, not applied)
        if self.max_consecutive and self.in_a_row >= self.max_consecutive:
            raise NonFiniteTrainingError(self._last_bad, self.in_a_row, self.total)

    def applied_at(self, step: int) -> bool:
        """Whether the latest step's update, ``step``, was applied, on the host: its device decision is read (waiting
        only for that step's own GPU work, normally done by the time the next step's backward is queued)."""
        for pending_step, bad, event in self._pending:
            if pending_step == step:
                if event is not None:
                    event.synchronize()
                return not bool(bad)
        return self._last_bad != step  # read already (a checkpoint or the end of training settled it)

    def finish(self) -> None:
        """Read every pending decision (end of training; before a checkpoint) and stop on a bad streak."""
        self._settle(keep_newest=False)
        if self.max_consecutive and self.in_a_row >= self.max_consecutive:
            raise NonFiniteTrainingError(self._last_bad, self.in_a_row, self.total)

    def _settle(self, keep_newest: bool) -> None:
        ready, self._pending = (self._pending[:-1], self._pending[-1:]) if keep_newest else (self._pending, [])
        for step, bad, event in ready:
            if event is not None:
                event.synchronize()  # recorded a step ago: normally done already
            self._count(step, bool(bad))

    def _count(self, step: int, bad: bool) -> None:
        if not bad:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        self._last_bad = step
        log.warning("step %d: non-finite loss or gradients; the update was skipped (%d in a row, %d in all)",
                    step, self.in_a_row, self.total)

    def state_dict(self) -> dict[str, int]:
        self._settle(keep_newest=False)
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int] | None) -> None:
        state = state or {}
        self.total, self.in_a_row = int(state.get("total", 0)), int(state.get("in_a_row", 0))
        self._pending = []


def _all(decisions: list[bool | Tensor]) -> bool | Tensor:
    """AND of the decisions: a host bool when one of them is ``False`` or none is a device tensor."""
    if not all(d for d in decisions if not isinstance(d, Tensor)):
        return False
    out: bool | Tensor = True
    for d in decisions:
        if isinstance(d, Tensor):
            out = d if out is True else out & d
    return out


def amp_scaler(trainer: pl.Trainer) -> Any:
    """The AMP ``GradScaler`` of a 16-mixed run (None for bf16 / fp32)."""
    return getattr(trainer.precision_plugin, "scaler", None)
