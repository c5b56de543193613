"""The pause for stalled Ray Data executors: it sleeps exactly after a loop step that changed nothing, longer
the longer the stall (up to a cap), and every dataset the pipeline builds carries it to its executor."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mugato_ray import ray_data_idle
from mugato_ray.ray_data_idle import IDLE_PAUSE_MAX_S, IDLE_PAUSE_S, IdleLoopPause, progress_state


class _Op:
    """An operator and its state in one: outputs taken, queued blocks, tasks in flight."""

    def __init__(self, taken: int = 0, queued: int = 0, active: int = 1):
        self.metrics = SimpleNamespace(num_outputs_taken=taken)
        self.queued, self.active = queued, active

    def total_enqueued_input_blocks(self) -> int:
        return self.queued

    def total_enqueued_output_blocks(self) -> int:
        return 0

    def num_active_tasks(self) -> int:
        return self.active


def _executor(*ops: _Op) -> SimpleNamespace:
    return SimpleNamespace(_topology={op: op for op in ops})


@pytest.fixture
def sleeps(monkeypatch):
    calls: list[float] = []
    monkeypatch.setattr(ray_data_idle.time, "sleep", calls.append)
    return calls


def test_a_step_that_changed_nothing_pauses_and_progress_does_not(sleeps):
    op, other = _Op(), _Op()
    executor, pause = _executor(op, other), IdleLoopPause()
    pause.on_execution_step(executor)  # the first step: nothing to compare with
    assert sleeps == []
    pause.on_execution_step(executor)  # stalled (e.g. a ready output it may not read): pause
    assert sleeps == [IDLE_PAUSE_S]
    for change in (lambda: setattr(op.metrics, "num_outputs_taken", 1), lambda: setattr(other, "queued", 3),
                   lambda: setattr(op, "active", 0)):
        change()
        pause.on_execution_step(executor)  # each kind of progress: no pause
        assert sleeps == [IDLE_PAUSE_S]
    pause.on_execution_step(executor)
    assert sleeps == [IDLE_PAUSE_S] * 2


def test_a_long_stall_pauses_longer_up_to_the_cap_and_progress_resets_it(sleeps):
    op = _Op()
    executor, pause = _executor(op), IdleLoopPause()
    for _ in range(12):
        pause.on_execution_step(executor)
    assert sleeps[:4] == [IDLE_PAUSE_S, 2 * IDLE_PAUSE_S, 4 * IDLE_PAUSE_S, 8 * IDLE_PAUSE_S]
    assert all(b >= a for a, b in zip(sleeps, sleeps[1:])) and sleeps[-1] == IDLE_PAUSE_MAX_S
    assert max(sleeps) == IDLE_PAUSE_MAX_S and IDLE_PAUSE_MAX_S > 4 * IDLE_PAUSE_S
    sleeps.clear()
    op.metrics.num_outputs_taken = 1  # the trainer took a block: no pause, and the next stall starts short
    pause.on_execution_step(executor)
    pause.on_execution_step(executor)
    assert sleeps == [IDLE_PAUSE_S]


def test_an_executor_it_cannot_read_is_never_slowed(sleeps):
    pause = IdleLoopPause()
    for _ in range(3):
        pause.on_execution_step(SimpleNamespace())  # no topology
        pause.on_execution_step(SimpleNamespace(_topology={object(): None}))  # operators of another shape
    assert sleeps == [] and progress_state(SimpleNamespace()) is None


def test_install_registers_the_pause_once():
    context = SimpleNamespace(custom_execution_callback_classes=[])
    ray_data_idle.install(context)
    ray_data_idle.install(context)
    assert context.custom_execution_callback_classes == [IdleLoopPause]


def test_the_pipelines_datasets_carry_the_pause(local_ray, tmp_path):
    from mugato_ray.config import load_config
    from mugato_ray.data import build_datasets, write_synthetic_store

    cfg = load_config("configs/smoke.yaml", [f"run_dir={tmp_path / 'run'}", "tasks=[{name: Pendulum-v1}]"])
    write_synthetic_store(cfg, 6, files=2, length=(20, 60))
    data = build_datasets(cfg)
    assert IdleLoopPause in data.datasets["Pendulum-v1"].context.execution_callback_classes
    assert len(data.datasets["Pendulum-v1"].take_all()) >= 6
