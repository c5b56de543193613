"""A pause for Ray Data's scheduling loop when it has nothing running, so idle task datasets leave the CPUs
to training.

Why this exists: each task dataset runs its own streaming executor (in its ``SplitCoordinator`` actor).
The executor's loop blocks in ``ray.wait`` (up to 0.1 s) on its running tasks, but with none running it
does not wait at all: an executor whose output buffer is full, waiting for the trainer to read, loops
as fast as it can. Measured here with the learning suite (11 task datasets, 2 cores): the five image
datasets (four BabyAI levels and VQA) filled their buffers first and spun at 20-45% of a core each, and the
other datasets' first batches and the trainer then crawled (18 steps in 9 minutes instead of ~300; a
run of the same config an hour earlier had not hit it).

:class:`IdleLoopPause` is an ``ExecutionCallback`` (Ray Data's extension point for the loop, registered
through ``DataContext.custom_execution_callback_classes``): after a loop step in which no operator has a
task in flight it sleeps :data:`IDLE_PAUSE_S`. A busy executor is untouched; an idle one wakes 50 times a
second, so a block the trainer asks for waits at most that long.
"""

from __future__ import annotations

import time
from typing import Any

from ray.data._internal.execution.execution_callback import ExecutionCallback

IDLE_PAUSE_S = 0.02
"""Sleep after a scheduling-loop step with no task in flight."""


def has_active_tasks(executor: Any) -> bool:
    """Whether any operator of ``executor``'s topology has a task in flight (True when it cannot tell, so
    that an executor of another shape is never slowed)."""
    topology = getattr(executor, "_topology", None)
    if not topology:
        return True
    try:
        return any(op.num_active_tasks() > 0 for op in topology)
    except AttributeError:
        return True


class IdleLoopPause(ExecutionCallback):
    """Sleeps :data:`IDLE_PAUSE_S` after an executor loop step in which nothing was running."""

    def on_execution_step(self, executor: Any) -> None:
        if not has_active_tasks(executor):
            time.sleep(IDLE_PAUSE_S)


def install(context: Any) -> None:
    """Register :class:`IdleLoopPause` on a ``DataContext`` (once); datasets created afterwards carry it to
    their executors."""
    if IdleLoopPause not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(IdleLoopPause)
