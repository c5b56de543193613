"""Publishing the trainer's weights to the online actors through Ray's object store (``online.enabled``).

Rank 0 calls :func:`publish_weights` every ``online.publish_every`` optimizer steps: a CPU copy of the state
dict is put in the object store once, and its reference is handed to a :class:`WeightBoard` actor, which
keeps the newest. Online actors ask the board between rounds and load the weights only when the step is
newer than theirs. This module is light on purpose: training workers import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class WeightBoard:
    """The newest published weights: ``(step, [object ref of the state dict])`` (a Ray actor)."""

    def __init__(self):
        self.step: int | None = None
        self.refs: list = []

    def publish(self, step: int, refs: list) -> None:
        if self.step is None or step >= self.step:
            self.step, self.refs = int(step), refs

    def latest(self) -> tuple[int | None, list]:
        return self.step, self.refs


def start_board() -> Any:
    """A :class:`WeightBoard` actor (it reserves no CPU: it only holds a reference)."""
    import ray

    return ray.remote(WeightBoard).options(num_cpus=0).remote()


def publish_weights(board: Any, model: torch.nn.Module, step: int) -> None:
    """Put a CPU copy of ``model``'s weights in the object store and hand its reference to ``board``. Not
    awaited: training does not wait for the actors."""
    import ray

    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    board.publish.remote(int(step), [ray.put(state)])  # in a list: the board keeps the reference, not the value
