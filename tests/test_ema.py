"""EMA of weights: the update rule by hand, the warm-up, and that checkpoints rebuild from EMA weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.models.ema import ema_decay_at, ema_update


def test_ema_update_by_hand():
    model, ema = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0), model.bias.fill_(2.0), ema.weight.fill_(0.0), ema.bias.fill_(0.0)
    ema_update(ema, model, decay=0.9)
    assert ema.weight.flatten().tolist() == pytest.approx([0.1, 0.1])
    assert ema.bias.item() == pytest.approx(0.2)
    ema_update(ema, model, decay=0.9)
    assert ema.bias.item() == pytest.approx(0.9 * 0.2 + 0.1 * 2.0)


def test_ema_warmup():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999) == pytest.approx(91 / 100)
    assert ema_decay_at(10**7, 0.999) == 0.999
    assert ema_decay_at(0, 0.999, warmup=False) == 0.999
