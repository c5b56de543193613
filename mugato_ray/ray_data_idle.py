"""A pause for Ray Data's scheduling loop when a step of it changed nothing, so idle task datasets leave
the CPUs to training.

Why this exists: each task dataset runs its own streaming executor (in its ``SplitCoordinator`` actor).
The executor's loop blocks in ``ray.wait`` (up to 0.1 s) on its tasks, but only until one of them has
output ready; an executor whose output is backpressured (its buffer full, waiting for the trainer to read)
leaves that output unread, so ``ray.wait`` returns at once, every time, and the loop spins. Measured here
with the learning suite (11 task datasets, 2 cores): the five image datasets (four BabyAI levels and VQA)
filled their buffers first and spun at 20-45% of a core each, and the other datasets' first batches and
the trainer then crawled (18 steps in 9 minutes instead of ~300; a run of the same config an hour earlier
had not hit it).

:class:`IdleLoopPause` is an ``ExecutionCallback`` (Ray Data's extension point for the loop, registered
through ``DataContext.custom_execution_callback_classes``): after a loop step that changed none of what
Ray Data's own no-progress guard watches (each operator's outputs taken, queued input and output blocks)
nor the tasks in flight, it sleeps: :data:`IDLE_PAUSE_S` after the first such step, twice as long after each
further one, up to :data:`IDLE_PAUSE_MAX_S`. An executor making progress is untouched, and its next stall
starts again at the shortest pause.

Why the pause grows: at a fixed 20 ms each stalled executor still woke 50 times a second, and a wake (the
loop's metrics, resource budgets and this check) costs about a millisecond: the suite's 11 coordinators took
0.39-0.41 of the machine's 2 cores together, while the trainer had 1.38-1.42. A backpressured executor stays
stalled for many training steps (one block of windows serves many batches), so it sleeps at the longest
pause nearly all the time; a refill then starts at most that much later, while the trainer still reads the
blocks in hand (reasoned, not measured apart: the suite's steps got faster, bench/README.md, "Idle task
datasets: a pause that grows").
"""

from __future__ import annotations

import time
from typing import Any

from ray.data._internal.execution.execution_callback import ExecutionCallback

IDLE_PAUSE_S = 0.02
"""Sleep after the first scheduling-loop step that changed nothing."""

IDLE_PAUSE_MAX_S = 0.2
"""The longest sleep: the pause doubles with each further step that changed nothing, up to this."""


def progress_state(executor: Any) -> tuple | None:
    """What a loop step can change, per operator: outputs taken, queued input and output blocks, tasks in
    flight. None when ``executor`` is of a shape this does not know (then it is never slowed)."""
    topology = getattr(executor, "_topology", None)
    if not topology:
        return None
    try:
        return tuple(
            (op.metrics.num_outputs_taken, state.total_enqueued_input_blocks(),
             state.total_enqueued_output_blocks(), op.num_active_tasks())
            for op, state in topology.items()
        )
    except AttributeError:
        return None


class IdleLoopPause(ExecutionCallback):
    """Sleeps after an executor loop step that changed nothing: :data:`IDLE_PAUSE_S`, doubling with each
    consecutive such step up to :data:`IDLE_PAUSE_MAX_S`; a step with progress resets it."""

    def __init__(self) -> None:
        self._last: tuple | None = None
        self._pause = 0.0

    def on_execution_step(self, executor: Any) -> None:
        state = progress_state(executor)
        if state is not None and state == self._last:
            self._pause = min(IDLE_PAUSE_MAX_S, max(IDLE_PAUSE_S, 2 * self._pause))
            time.sleep(self._pause)
        else:
            self._pause = 0.0
        self._last = state


def install(context: Any) -> None:
    """Register :class:`IdleLoopPause` on a ``DataContext`` (once); datasets created afterwards carry it to
    their executors."""
    if IdleLoopPause not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(IdleLoopPause)
