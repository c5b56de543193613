"""Tasks resolved once: a registry row with its token spec, sequence layout and reference returns.

A job resolves each configured task at start (:func:`resolve_tasks`) and hands the immutable
:class:`ResolvedTask` to collection, the data pipeline, training, rollouts and evaluation, which then
neither look the registry up again nor rebuild specs and layouts from the whole config.

Reference returns come from ``references.yaml`` (``tasks.reference_returns``), unless the run's store of the
task holds references that came with imported data (``episodes.REFERENCES_FILE``, written by
``minari_io.import_dataset`` from a Minari dataset's ``ref_max_score``/``ref_min_score``): those win, for
that run only, because they are what the imported demonstrations are measured against; the report says
which was used (``ResolvedTask.reference_origin``).

Registration lives here too (:func:`register_task`): checking a row's wrappers, expert and success
criterion needs ``envs`` and ``experts``, while the registry itself (``mugato_ray.tasks``) stays a leaf
table that imports nothing of the package.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mugato_ray import tasks
from mugato_ray.episodes import read_store_references, store_dir
from mugato_ray.sequence import SequenceLayout, make_layout
from mugato_ray.specs import space_spec
from mugato_ray.tasks import DOMAINS, ENV_DOMAINS, TaskInfo, get_task
from mugato_ray.tokenizer import SpaceSpec, make_vocab

if TYPE_CHECKING:
    from mugato_ray.config import Config, TaskEntry


@dataclass(frozen=True, eq=False)
class ResolvedTask:
    """Everything the pipeline needs to know about one task of a run, computed once."""

    info: TaskInfo
    """The registry row."""
    spec: SpaceSpec
    """How its observations and actions become tokens (under the run's tokenizer config)."""
    layout: SequenceLayout
    """The fixed (E, T, C) shapes of its training sequences (model.context and the task's window)."""
    expert_return: float | None
    """Measured expert return (references.yaml); None where none was measured."""
    random_return: float | None
    """Measured random-policy return; None where none was measured."""
    entry: TaskEntry | None = None
    """The run config's entry for the task (weight, episodes, window, ...); None for a task outside it."""
    reference_origin: str | None = None
    """Where the references come from: "references.yaml", or the origin recorded with the store's imported
    references (e.g. a Minari dataset); None when the task has none."""

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def references(self) -> tuple[float | None, float | None]:
        """(expert_return, random_return)."""
        return self.expert_return, self.random_return

    def min_return(self, fraction: float) -> float | None:
        """GATO's return filter: the return an expert (or policy) episode must reach to be kept, ``fraction``
        of the way from the random to the expert reference: ``random + fraction * (expert - random)``.

        That is ``fraction * expert`` when random scores 0, and it stays meaningful for tasks with negative
        returns (Pendulum, Acrobot), where ``fraction * expert`` would demand more than the expert achieves.
        None (no filter) when ``fraction <= 0`` or no expert return was measured.
        """
        if fraction <= 0 or self.expert_return is None:
            return None
        base = self.random_return if self.random_return is not None else 0.0
        return base + fraction * (self.expert_return - base)


# ---------------------------------------------------------------------------------------------
# Registration


def validate_task(info: TaskInfo) -> TaskInfo:
    """Check a row against the known domains, wrappers, experts and success criteria; return it."""
    # Lazy: envs and experts import gymnasium, which a process that only reads layouts does not need.
    from mugato_ray import envs, experts

    where = f"task {info.name!r}"
    if not info.name:
        raise ValueError("a task needs a non-empty name")
    if info.domain not in DOMAINS:
        raise ValueError(f"{where}: domain must be one of {DOMAINS}, got {info.domain!r}")
    if (info.domain in ENV_DOMAINS) != info.has_env:
        raise ValueError(
            f"{where}: domain {info.domain!r} {'needs' if info.domain in ENV_DOMAINS else 'takes no'} env_id"
        )
    if not info.has_env and not info.dataset:
        raise ValueError(f"{where}: a task without env_id needs a dataset name")
    for w in info.wrappers:
        envs.parse_wrapper(w, where)
    experts.parse_expert(info.expert, where)
    if info.success is not None:
        envs.success_criterion(info.success, where)
    if info.max_episode_steps is not None and info.max_episode_steps < 1:
        raise ValueError(f"{where}: max_episode_steps must be >= 1, got {info.max_episode_steps}")
    return info


def register_task(info: TaskInfo, *, replace: bool = False) -> None:
    """Add a row (validated). Replacing an existing name needs ``replace=True``: silent shadowing hides typos.

    A registration lives in this process only: Ray actors see the table as imported, so a task they must
    run is either a table row or registered in the actor (or passed to them resolved, as a ResolvedTask).
    """
    validate_task(info)
    if info.name in tasks.TASKS and not replace:
        raise ValueError(f"task {info.name!r} is already registered; pass replace=True to replace it")
    tasks.TASKS[info.name] = info


# ---------------------------------------------------------------------------------------------
# Spaces and token specs


@functools.lru_cache(maxsize=64)
def env_spaces(info: TaskInfo) -> tuple[Any, Any]:
    """(observation_space, action_space) of the task's wrapped env, built once per process."""
    from mugato_ray.envs import make_env  # lazy: keeps gymnasium out of processes without envs

    env = make_env(info)
    try:
        return env.observation_space, env.action_space
    finally:
        env.close()


def task_spec(name: str | TaskInfo, cfg: Config) -> SpaceSpec:
    """How the task's observations and actions become tokens, under ``cfg.tokenizer``.

    Env tasks: from the wrapped env's spaces via specs.space_spec. Dataset tasks: datasets.dataset_spec.
    """
    info = get_task(name)
    if not info.has_env:
        from mugato_ray.datasets import dataset_spec  # lazy: builds gymnasium spaces for VQA

        return dataset_spec(info.name, cfg)
    obs_space, act_space = env_spaces(info)
    return space_spec(obs_space, act_space, cfg.tokenizer, make_vocab(cfg.tokenizer))


# ---------------------------------------------------------------------------------------------
# Resolution


def resolve_task(task: str | TaskInfo | ResolvedTask, cfg: Config) -> ResolvedTask:
    """``task`` resolved under ``cfg`` (a ResolvedTask is returned as is). Unknown names -> ValueError."""
    if isinstance(task, ResolvedTask):
        return task
    info = get_task(task)
    entry = cfg.task(info.name)
    spec = task_spec(info, cfg)
    layout = make_layout(info.name, spec, cfg.model.context, entry.window if entry else None)
    expert, random, origin = task_references(info, cfg)
    return ResolvedTask(info=info, spec=spec, layout=layout, expert_return=expert, random_return=random,
                        entry=entry, reference_origin=origin)


def task_references(info: TaskInfo, cfg: Config) -> tuple[float | None, float | None, str | None]:
    """(expert_return, random_return, origin) of a task in ``cfg``'s run: the references stored with imported
    data in its store (they win: see the module doc), else references.yaml's, else (None, None, None)."""
    stored = read_store_references(store_dir(cfg, info.name))
    if stored is not None:
        return stored["expert_return"], stored["random_return"], stored["origin"]
    expert, random = tasks.reference_returns(info)  # through the module: tests replace the table
    origin = None if expert is None and random is None else "references.yaml"
    return expert, random, origin


def resolve_tasks(cfg: Config) -> dict[str, ResolvedTask]:
    """Every task of ``cfg.tasks``, resolved, in config order."""
    return {t.name: resolve_task(t.name, cfg) for t in cfg.tasks}
