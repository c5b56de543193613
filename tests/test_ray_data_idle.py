"""The pause for idle Ray Data executors: it sleeps exactly when nothing is in flight, and every dataset
the pipeline builds carries it to its executor."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mugato_ray import ray_data_idle
from mugato_ray.ray_data_idle import IDLE_PAUSE_S, IdleLoopPause, has_active_tasks


class _Op:
    """An operator with ``n`` tasks in flight (the executor's topology maps operators to their states)."""

    def __init__(self, n: int):
        self.n = n

    def num_active_tasks(self) -> int:
        return self.n


def _executor(*active: int) -> SimpleNamespace:
    return SimpleNamespace(_topology={_Op(n): None for n in active})


@pytest.fixture
def sleeps(monkeypatch):
    calls: list[float] = []
    monkeypatch.setattr(ray_data_idle.time, "sleep", calls.append)
    return calls


def test_an_executor_with_nothing_in_flight_pauses(sleeps):
    IdleLoopPause().on_execution_step(_executor(0, 0, 0))
    assert sleeps == [IDLE_PAUSE_S]


def test_an_executor_with_a_task_in_flight_does_not_pause(sleeps):
    IdleLoopPause().on_execution_step(_executor(0, 2, 0))
    assert sleeps == []


def test_an_executor_it_cannot_read_is_never_slowed(sleeps):
    IdleLoopPause().on_execution_step(SimpleNamespace())  # no topology
    IdleLoopPause().on_execution_step(SimpleNamespace(_topology={object(): None}))  # ops of another shape
    assert sleeps == [] and has_active_tasks(SimpleNamespace())


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
