"""``train.ema_decay``: an exponential moving average of the weights, the weights a run acts with.

SGD's last iterate carries the noise of its last steps: in the demo, text-arith's exact answers come and
go from one snapshot to the next (bench/README.md, "A faster text-arith step, or 750 steps"). A moving
average of the weights over the last ``1 / (1 - decay)`` steps smooths that noise out at the cost of one
copy of the weights and one ``lerp`` per step. After optimizer step ``t`` (counted from 0)::

    avg <- d_t * avg + (1 - d_t) * weights,     d_t = min(decay, (1 + t) / (10 + t))

so that early on, when the weights move fast, the average follows them closely (the warm-up of
TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``). Only floating-point tensors are
averaged; integer buffers are copied.

With the option on, the average is what a run acts with: snapshots scored during training and each
checkpoint's ``model.pt`` hold it, so evaluation, export and every reader of a checkpoint see it, and the
training weights go into the checkpoint's ``state.pt`` (``"train_model"``) so training resumes exactly.
Online rollouts act with the training weights (their experience is the current policy's).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch

KEY = "train.ema_decay"


def decay_at(decay: float, step: int) -> float:
    """The averaging factor after optimizer step ``step`` (0-based): ``min(decay, (1 + step) / (10 + step))``."""
    return min(decay, (1.0 + step) / (10.0 + step))


class WeightAverage:
    """An exponential moving average of ``model``'s weights, kept in a copy of the model (:attr:`model`)."""

    def __init__(self, model: torch.nn.Module, decay: float, start: Mapping[str, torch.Tensor] | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"{KEY}={decay}: expected a value in (0, 1), e.g. 0.99 (0 turns it off)")
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        """The averaged weights, a model of the same class (what snapshots and checkpoints save)."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        if start is not None:  # a resumed run's average, from its checkpoint
            self.model.load_state_dict(start)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Fold ``model``'s weights after optimizer step ``step`` into the average."""
        weight = 1.0 - decay_at(self.decay, step)
        averaged, current = self.model.state_dict(), model.state_dict()
        for name, avg in averaged.items():
            now = current[name].to(avg.device)
            if avg.is_floating_point():
                avg.lerp_(now, weight)
            else:
                avg.copy_(now)
