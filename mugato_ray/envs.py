"""Building a task's Gymnasium env, the observation wrappers it needs, and what "success" means.

``make_env`` is module-level and takes a name or a TaskInfo, so ``functools.partial(make_env, task)`` is a
picklable thunk for Ray actors and RLlib. Wrappers are named in the task table (``envs.WRAPPERS``);
an entry may carry one argument after a colon, e.g. ``"crash_at_step:5:3,7"``.

Observations leave the env as they are; ``flatten_observation`` turns one into the project's flat form
(key -> value, nested Dict keys joined with "/", a non-Dict space under the key "observation") and
``stack_observations`` batches N of them for ``Policy.act``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from mugato_ray.tasks import TaskInfo, get_task

# Packages that register env ids on import, per domain (imported lazily: each costs ~1 s).
_DOMAIN_MODULES = {"babyai": "minigrid", "atari": "ale_py"}

# ---------------------------------------------------------------------------------------------
# Wrappers
# ---------------------------------------------------------------------------------------------

# BabyAI missions are lowercase words, digits and a little punctuation; Text checks every character.
MISSION_CHARSET = string.ascii_letters + string.digits + " ,.;:'!?-_()"
MISSION_MAX_LENGTH = 512


class BabyAIObservation(gym.ObservationWrapper):
    """Dict{"direction": Discrete(4), "image": (56, 56, 3) uint8 RGB partial view, "mission": Text}.

    minigrid's MissionSpace is not a gymnasium Text space; the tokenizer maps Text to text tokens, so it is
    replaced here. The image is minigrid's RGBImgPartialObsWrapper at tile_size=8: 7x7 tiles -> 56x56,
    which is 4x4 = 16 patches of 16x16.
    """

    TILE_SIZE = 8

    def __init__(self, env: gym.Env):
        from minigrid.wrappers import RGBImgPartialObsWrapper

        super().__init__(RGBImgPartialObsWrapper(env, tile_size=self.TILE_SIZE))
        inner = self.env.observation_space
        self.observation_space = spaces.Dict(
            {
                "direction": inner["direction"],
                "image": inner["image"],
                "mission": spaces.Text(max_length=MISSION_MAX_LENGTH, min_length=0, charset=MISSION_CHARSET),
            }
        )

    def reset(self, **kwargs):
        # minigrid prints a line for every rejected level sample; keep actor and test logs readable.
        with contextlib.redirect_stdout(io.StringIO()):
            return super().reset(**kwargs)

    def observation(self, obs: dict) -> dict:
        return {"direction": int(obs["direction"]), "image": obs["image"], "mission": str(obs["mission"])}


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32: output pixel i is the area-weighted mean of the input pixels it covers."""
    scale = n_in / n_out
    lo_O1 = (np.arange(n_out) * scale)[:, None]
    j_1I = np.arange(n_in)[None, :]
    overlap_OI = np.clip(np.minimum(lo_O1 + scale, j_1I + 1) - np.maximum(lo_O1, j_1I), 0.0, None)
    return (overlap_OI / scale).astype(np.float32)


class AtariGray(gym.ObservationWrapper):
    """ALE frames -> (size, size, 1) uint8 grayscale by area averaging (the standard 84x84 DQN view).

    Accepts grayscale (H, W) frames (``obs_type="grayscale"``, cheapest) or RGB (H, W, 3) frames
    (ITU-R 601 luma). The resize is two small matmuls, ``rows_OxH @ frame_HxW @ cols_WxO``: vectorized,
    and no OpenCV dependency.
    """

    def __init__(self, env: gym.Env, size: int = 84):
        super().__init__(env)
        shape = env.observation_space.shape
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[-1] not in (1, 3)):
            raise ValueError(f"atari_gray{size}: expected an (H, W) or (H, W, 1|3) frame, got {env.observation_space}")
        self._rows_OxH = _area_matrix(shape[0], size)
        self._cols_WxO = _area_matrix(shape[1], size).T.copy()
        self._luma = np.array([0.299, 0.587, 0.114], np.float32)
        self.observation_space = spaces.Box(0, 255, (size, size, 1), np.uint8)

    def observation(self, frame: np.ndarray) -> np.ndarray:
        gray_HxW = frame.astype(np.float32)
        if gray_HxW.ndim == 3:
            gray_HxW = gray_HxW @ self._luma if gray_HxW.shape[-1] == 3 else gray_HxW[..., 0]
        out_OxO = self._rows_OxH @ gray_HxW @ self._cols_WxO
        return np.clip(np.rint(out_OxO), 0, 255).astype(np.uint8)[..., None]


class Float32Observation(gym.ObservationWrapper):
    """Float Box observations as float32 (MuJoCo returns float64): half the bytes in the store."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        space = env.observation_space
        if not (isinstance(space, spaces.Box) and np.issubdtype(space.dtype, np.floating)):
            raise ValueError(f"float32_obs: expected a float Box observation space, got {space}")
        self.observation_space = spaces.Box(
            space.low.astype(np.float32), space.high.astype(np.float32), space.shape, np.float32
        )

    def observation(self, obs: np.ndarray) -> np.ndarray:
        return np.asarray(obs, dtype=np.float32)


class CrashAtStep(gym.Wrapper):
    """Failure injection for tests: ``step`` raises at step k of an episode (of the given seeds only, if any).

    Spec string: ``"crash_at_step:<k>"`` or ``"crash_at_step:<k>:<seed>,<seed>..."``.
    """

    def __init__(self, env: gym.Env, step: int, seeds: frozenset[int] | None = None):
        super().__init__(env)
        self.crash_step, self.crash_seeds = step, seeds
        self._t, self._seed = 0, None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self._t, self._seed = 0, seed
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        self._t += 1
        if self._t == self.crash_step and (self.crash_seeds is None or self._seed in self.crash_seeds):
            raise RuntimeError(
                f"crash_at_step: injected failure at step {self._t} of the episode with seed {self._seed}"
            )
        return self.env.step(action)


def _crash_at_step(env: gym.Env, arg: str | None) -> gym.Env:
    if not arg:
        raise ValueError("wrapper 'crash_at_step' needs an argument: 'crash_at_step:<k>[:<seed>,<seed>...]'")
    step, _, seeds = arg.partition(":")
    return CrashAtStep(env, int(step), frozenset(int(s) for s in seeds.split(",")) if seeds else None)


WRAPPERS: dict[str, Callable[..., gym.Env]] = {
    "babyai": BabyAIObservation,
    "atari_gray84": lambda env: AtariGray(env, 84),
    "float32_obs": Float32Observation,
    "crash_at_step": _crash_at_step,
}
_WRAPPERS_WITH_ARG = frozenset({"crash_at_step"})


def parse_wrapper(entry: str, where: str = "") -> tuple[str, str | None]:
    """``"name"`` or ``"name:arg"`` -> (name, arg); unknown names -> ValueError naming ``where`` and the known ones."""
    name, sep, arg = entry.partition(":")
    if name not in WRAPPERS:
        raise ValueError(f"{where}: unknown wrapper {entry!r}; known wrappers: {sorted(WRAPPERS)}")
    if bool(sep) != (name in _WRAPPERS_WITH_ARG):
        raise ValueError(f"{where}: wrapper {name!r} {'needs' if name in _WRAPPERS_WITH_ARG else 'takes no'} ':<arg>'")
    return name, (arg if sep else None)


def apply_wrappers(env: gym.Env, entries: Sequence[str], where: str = "") -> gym.Env:
    for entry in entries:
        name, arg = parse_wrapper(entry, where)
        env = WRAPPERS[name](env, arg) if name in _WRAPPERS_WITH_ARG else WRAPPERS[name](env)
    return env


def make_env(task: TaskInfo | str, render_mode: str | None = None) -> gym.Env:
    """The task's env: gym.make (with TimeLimit when the task sets max_episode_steps), then its wrappers.

    ``render_mode`` goes to gym.make; the wrappers keep the env's ``render``. MuJoCo renders off screen through
    EGL unless ``MUJOCO_GL`` says otherwise: its default (GLFW) needs a display, which cluster nodes lack;
    pygame (classic control) draws with SDL's dummy audio and video drivers unless ``SDL_*DRIVER`` say otherwise.
    """
    info = get_task(task)
    if not info.has_env:
        raise ValueError(f"task {info.name!r} is a dataset task ({info.dataset!r}); it has no environment")
    if render_mode is not None and info.domain == "mujoco":
        os.environ.setdefault("MUJOCO_GL", "egl")  # read when the env first renders
    if render_mode == "rgb_array":
        # Classic control draws with pygame, whose init opens an audio device and a display: without them it
        # prints ALSA and XDG_RUNTIME_DIR errors on the console. Off-screen drawing needs neither.
        os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    module = _DOMAIN_MODULES.get(info.domain)
    if module is not None:
        importlib.import_module(module)  # registers the env ids (ale_py: "ALE/...", minigrid: "BabyAI-...")
    env = gym.make(
        info.env_id, render_mode=render_mode, max_episode_steps=info.max_episode_steps, **dict(info.env_kwargs)
    )
    return apply_wrappers(env, info.wrappers, f"task {info.name!r}")


# ---------------------------------------------------------------------------------------------
# Flat observations
# ---------------------------------------------------------------------------------------------


def flatten_observation(obs: Any, space: spaces.Space, key: str = "observation") -> dict[str, np.ndarray | str]:
    """One env's observation -> {key: value}: arrays in the space's dtype, text as str.

    A non-Dict space gives {"observation": obs}; Dict keys are kept (nested ones joined with "/"), as in
    specs.space_spec, so the keys match the task's SpaceSpec fields.
    """
    if isinstance(space, spaces.Dict):
        flat: dict[str, np.ndarray | str] = {}
        for k, sub in space.spaces.items():
            if k not in obs:
                raise KeyError(f"observation is missing Dict key {k!r} (space keys: {list(space.spaces)})")
            flat.update(flatten_observation(obs[k], sub, k if key == "observation" else f"{key}/{k}"))
        return flat
    if isinstance(space, spaces.Text):
        return {key: str(obs)}
    return {key: np.asarray(obs, dtype=space.dtype)}


def unflatten_observations(flat: Mapping[str, Any], space: spaces.Space, key: str = "observation") -> Any:
    """The inverse of :func:`flatten_observation`'s keys: flat fields (``key -> value``, e.g. stacked ``(N, *shape)``
    arrays) back in the space's own structure (a Dict space -> a dict by its keys, nested; else the one field)."""
    if isinstance(space, spaces.Dict):
        return {k: unflatten_observations(flat, sub, k if key == "observation" else f"{key}/{k}")
                for k, sub in space.spaces.items()}
    return flat[key]


def stack_observations(flats: Sequence[Mapping[str, np.ndarray | str]]) -> dict[str, np.ndarray | list[str]]:
    """N flat observations -> key -> (N, *shape) array, or list[str] of length N for text."""
    if not flats:
        raise ValueError("stack_observations needs at least one observation")
    keys = list(flats[0])
    out: dict[str, np.ndarray | list[str]] = {}
    for i, flat in enumerate(flats):
        if list(flat) != keys:
            raise ValueError(f"observation {i} has keys {list(flat)}, expected {keys} like observation 0")
    for k in keys:
        if isinstance(flats[0][k], str):
            out[k] = [str(f[k]) for f in flats]
        else:
            out[k] = np.stack([f[k] for f in flats])
    return out


# ---------------------------------------------------------------------------------------------
# Success criteria
# ---------------------------------------------------------------------------------------------

SuccessFn = Callable[[float, bool, Mapping], bool]


def _return_at_least(threshold: str) -> SuccessFn:
    t = float(threshold)  # parsed here, so a bad number fails when the task is registered
    return lambda ret, terminated, info: ret >= t


def _info_at_least(arg: str) -> SuccessFn:
    key, sep, threshold = arg.rpartition(":")
    if not (sep and key):
        raise ValueError("expected 'info_at_least:<info key>:<x>'")
    t = float(threshold)
    # The info of the episode's last step; an episode that ended without one (a policy that could not act)
    # or whose info lacks the key did not succeed.
    return lambda ret, terminated, info: key in info and float(info[key]) >= t


SUCCESS: dict[str, Callable[..., SuccessFn]] = {
    # BabyAI gives a positive reward (1 - 0.9 * steps / max_steps) only when the mission is done.
    "babyai": lambda: lambda ret, terminated, info: ret > 0,
    # Envs that terminate exactly at their goal (MountainCar, Acrobot); a time limit truncates instead.
    "terminated": lambda: lambda ret, terminated, info: bool(terminated),
    "return_at_least": _return_at_least,
    # A quantity the env reports in the last step's info, e.g. Reacher's reward_dist (minus the final distance).
    "info_at_least": _info_at_least,
}
"""Named success criteria: name -> factory(*args) -> fn(episode_return, terminated, info) -> bool."""


def success_criterion(name: str, where: str = "") -> SuccessFn:
    """``"babyai"``, ``"terminated"``, ``"return_at_least:<x>"`` or ``"info_at_least:<key>:<x>"`` -> fn(episode_return,
    terminated, info of the last step)."""
    base, sep, arg = name.partition(":")
    if base not in SUCCESS:
        raise ValueError(f"{where}: unknown success criterion {name!r}; known: {sorted(SUCCESS)}")
    try:
        return SUCCESS[base](arg) if sep else SUCCESS[base]()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: bad success criterion {name!r}: {e}") from None


def is_success(
    task: TaskInfo | str, episode_return: float, terminated: bool, info: Mapping | None = None
) -> bool | None:
    """Whether a finished episode succeeded by the task's criterion; None if the task defines none."""
    info_ = get_task(task)
    if info_.success is None:
        return None
    fn = success_criterion(info_.success, f"task {info_.name!r}")
    return bool(fn(float(episode_return), bool(terminated), info or {}))
