"""The task registry: a plain table from task name to environment, wrappers, expert and success criterion.

A leaf module: it imports nothing of the package. A task whose Gymnasium spaces are standard needs no
code, only a row (or a ``resolve.register_task`` call, which validates the row first). Dataset tasks
(text, vision-language) have no environment: their episodes come from ``mugato_ray.datasets``.
``mugato_ray.resolve`` turns a row into what the pipeline uses (token spec, layout, references).

Reference returns (expert and random, measured with our own code over >= 20 seeds by
``jobs/measure_references.py``) live in ``references.yaml`` next to this file; they turn returns into
GATO's normalized score ``(score - random) / (expert - random)``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DOMAINS = ("babyai", "classic", "mujoco", "atari", "text", "vqa")
ENV_DOMAINS = ("babyai", "classic", "mujoco", "atari")
REFERENCES_PATH = Path(__file__).with_name("references.yaml")


@dataclass(frozen=True)
class TaskInfo:
    """One row of the registry."""

    name: str
    """Registry key, e.g. "CartPole-v1", "BabyAI-GoToRedBall-v0", "ALE/Pong-v5", "text-arith"."""
    domain: str
    """One of DOMAINS; env domains also decide which package registers the env id (minigrid, ale_py)."""
    env_id: str | None = None
    """Gymnasium id; None for dataset tasks."""
    env_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """Keyword arguments of gym.make."""
    wrappers: tuple[str, ...] = ()
    """Names in envs.WRAPPERS, applied in order; "name:arg" passes an argument."""
    expert: str = "none"
    """"babyai_bot" | "scripted:<name in experts.SCRIPTED>" | "atari_ram:<name in atari_experts.RAM_CONTROLLERS>"
    | "rllib:<checkpoint dir>" | "none"."""
    success: str | None = None
    """A criterion of envs.SUCCESS ("babyai", "terminated", "return_at_least:<x>", "info_at_least:<key>:<x>");
    None: the task defines none."""
    max_episode_steps: int | None = None
    """TimeLimit applied by envs.make_env (None: the env's own limit)."""
    dataset: str | None = None
    """Name in datasets.DATASETS for dataset tasks."""

    @property
    def has_env(self) -> bool:
        return self.env_id is not None


def _babyai(level: str) -> TaskInfo:
    # The bot solves these levels; success is BabyAI's own: a positive reward only comes with success.
    return TaskInfo(
        name=f"BabyAI-{level}-v0",
        domain="babyai",
        env_id=f"BabyAI-{level}-v0",
        wrappers=("babyai",),
        expert="babyai_bot",
        success="babyai",
    )


def _atari(game: str) -> TaskInfo:
    # ALE's native grayscale frame (no RGB->gray conversion in Python), area-resized to 84x84x1 by the
    # wrapper: 36 patches of 16x16 per step after zero-padding to 96x96. ALE v5 defaults otherwise (frameskip
    # 4, sticky actions 0.25, 108,000 frames = 27,000 steps at most). Expert: a controller that reads the
    # paddle and ball from the emulator's RAM (atari_experts.py; no GPU, no training) while episodes record
    # the frame. A game without one would take an RLlib PPO checkpoint (jobs/train_expert.py).
    return TaskInfo(
        name=f"ALE/{game}-v5",
        domain="atari",
        env_id=f"ALE/{game}-v5",
        env_kwargs={"obs_type": "grayscale"},
        wrappers=("atari_gray84",),
        expert=f"atari_ram:{game.lower()}",
    )


_TABLE: tuple[TaskInfo, ...] = (
    _babyai("GoToRedBall"),
    _babyai("GoToLocal"),
    _babyai("PickupLoc"),
    _babyai("OpenDoor"),
    # Missions that must be read: which of four doors (by color); which object among distractors (by color,
    # type or both); which object to put next to which (up to 43 characters, the longest mission here).
    _babyai("GoToDoor"),
    _babyai("PickupDist"),
    _babyai("PutNextLocal"),
    # Missions that need not be read: the only object in the room; "open the door" (fetch the key first).
    _babyai("GoToObj"),
    _babyai("UnlockLocal"),
    TaskInfo("CartPole-v1", "classic", "CartPole-v1", expert="scripted:cartpole", success="return_at_least:475"),
    # Acrobot and MountainCar terminate exactly when the goal is reached.
    TaskInfo("Acrobot-v1", "classic", "Acrobot-v1", expert="scripted:acrobot", success="terminated"),
    TaskInfo("MountainCar-v0", "classic", "MountainCar-v0", expert="scripted:mountaincar", success="terminated"),
    # Pendulum has no goal state; -400 separates swinging up and balancing from failing to (random: ~-1200).
    TaskInfo("Pendulum-v1", "classic", "Pendulum-v1", expert="scripted:pendulum", success="return_at_least:-400"),
    # float64 observations are stored as float32: tokenization bins are far coarser than float32 precision.
    TaskInfo(
        "InvertedPendulum-v5",
        "mujoco",
        "InvertedPendulum-v5",
        wrappers=("float32_obs",),
        expert="scripted:inverted_pendulum",
        success="return_at_least:1000",
    ),
    # Gymnasium's reward_threshold for the env: at most 9.36 per step (10 alive, minus 0.64 for the tip's
    # height), so >= 9100 means balancing at least 973 of the 1000 steps (random: ~50, down within 13 steps).
    TaskInfo(
        "InvertedDoublePendulum-v5",
        "mujoco",
        "InvertedDoublePendulum-v5",
        wrappers=("float32_obs",),
        expert="scripted:inverted_double_pendulum",
        success="return_at_least:9100",
    ),
    # The fingertip ends within 2 cm of the target (their spheres, radii 1 and 0.9 cm, touch): the return
    # cannot tell reaching from not, since it depends on how far the target starts (seeds 0..99: the expert
    # -6.2 to -0.55, all within 2 cm; staying still -20 to -1.7, none; random -54 to -35, 2 of 100).
    TaskInfo(
        "Reacher-v5",
        "mujoco",
        "Reacher-v5",
        wrappers=("float32_obs",),
        expert="scripted:reacher",
        success="info_at_least:reward_dist:-0.02",
    ),
    _atari("Pong"),
    _atari("Breakout"),
    TaskInfo("text-arith", "text", dataset="arith"),
    TaskInfo("vqa-minigrid-color", "vqa", dataset="vqa_color"),
    TaskInfo("text-files", "text", dataset="text_files"),
)

TASKS: dict[str, TaskInfo] = {t.name: t for t in _TABLE}


def get_task(name: str | TaskInfo) -> TaskInfo:
    """The registry row of ``name`` (a TaskInfo is returned as is). Unknown -> ValueError listing the known names."""
    if isinstance(name, TaskInfo):
        return name
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None


@functools.lru_cache(maxsize=1)
def _references() -> dict[str, dict]:
    data = yaml.safe_load(REFERENCES_PATH.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{REFERENCES_PATH}: expected a mapping task -> {{expert_return, random_return, ...}}")
    return data


def reference_returns(name: str | TaskInfo) -> tuple[float | None, float | None]:
    """(expert_return, random_return) measured for ``name``; (None, None) where none was measured."""
    info = get_task(name)  # unknown names are errors, not silently unreferenced
    row = _references().get(info.name) or {}
    expert, random = row.get("expert_return"), row.get("random_return")
    return (None if expert is None else float(expert), None if random is None else float(random))
