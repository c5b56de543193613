"""Training RLlib PPO experts (new API stack) for tasks without a scripted expert: jobs/train_expert.py.

``train_ppo_expert`` trains on the task's wrapped env (``envs.make_env``; uint8 images normalized as
``experts.rllib_observation`` does when acting) with the ``ppo:`` config section, and saves the Algorithm
checkpoint under ``<run_dir>/experts/<task>/`` atomically; ``experts.RLlibPolicy`` then acts with it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gymnasium import spaces

from mugato_ray.envs import make_env
from mugato_ray.tasks import TaskInfo, get_task

if TYPE_CHECKING:
    import gymnasium as gym

    from mugato_ray.config import Config, PPOConfig


def _rllib_env(info: TaskInfo, env_config: dict | None = None) -> gym.Env:
    """RLlib's env creator: the task's wrapped env, uint8 images normalized like ``rllib_observation``."""
    env = make_env(info)
    space = env.observation_space
    if isinstance(space, spaces.Box) and space.dtype == np.uint8:
        from ray.rllib.env.wrappers.atari_wrappers import NormalizedImageEnv

        env = NormalizedImageEnv(env)
    elif not isinstance(space, spaces.Box):
        raise ValueError(
            f"task {info.name!r}: PPO experts need a Box observation space, got {space} (BabyAI uses its bot)"
        )
    return env


def expert_dir(cfg: Config, task: TaskInfo | str) -> Path:
    """Where the PPO expert of ``task`` is saved: <run_dir>/experts/<task>/ (task names may hold a "/")."""
    return Path(cfg.run_dir) / "experts" / get_task(task).name


def train_ppo_expert(
    task: TaskInfo | str, ppo: PPOConfig, out_dir: str | Path, *, log: Callable[[str], None] = print
) -> Path:
    """Train a PPO expert with RLlib (new API stack) as ``ppo`` (the config's ``ppo`` section) says, save the
    Algorithm checkpoint to ``out_dir`` (usually :func:`expert_dir`) and return that folder.

    The env is registered through tasks/envs.make_env, so the task's wrappers apply. Stops early once the
    sampled mean return reaches ``ppo.target_return``. Writes ``expert.json`` (task, iterations, env steps,
    last mean return) next to the checkpoint. Ray must be initialized by the caller (or RLlib starts a local
    one).
    """
    info = get_task(task)
    if ppo.iterations < 1:
        raise ValueError(f"train_ppo_expert: iterations must be >= 1, got {ppo.iterations}")
    if ppo.seed is None:
        raise ValueError("train_ppo_expert: ppo.seed is None (a Config resolves it from the root seed)")
    path = Path(out_dir)
    # Save beside the target, then swap it in: a reader never sees a half-written or mixed checkpoint.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    algo = _ppo_algorithm(info, ppo)
    t0 = time.perf_counter()
    try:
        it, mean_return, env_steps = _ppo_iterations(algo, info, ppo, log)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        algo.save_to_path(str(tmp.resolve()))
    finally:
        algo.stop()
    meta = {
        "task": info.name,
        "iterations": it,
        "env_steps": env_steps,
        "sampled_mean_return": mean_return,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (tmp / "expert.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def _ppo_algorithm(info: TaskInfo, ppo: PPOConfig) -> Any:
    """An RLlib PPO Algorithm on the task's env (registered as ``mugato/<task>``), built from ``ppo``."""
    from ray.rllib.algorithms.ppo import PPOConfig as RLlibPPOConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
    from ray.tune.registry import register_env

    env_name = f"mugato/{info.name}"
    register_env(env_name, functools.partial(_rllib_env, info))
    config = (
        RLlibPPOConfig()
        .environment(env=env_name)
        .env_runners(num_env_runners=ppo.num_env_runners, num_envs_per_env_runner=ppo.num_envs_per_env_runner)
        .training(
            lr=ppo.lr,
            train_batch_size_per_learner=ppo.train_batch_size,
            minibatch_size=ppo.minibatch_size,
            num_epochs=ppo.num_epochs,
        )
        .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=list(ppo.hidden)))
        .debugging(seed=ppo.seed)
    )
    return config.build_algo()


def _ppo_iterations(algo: Any, info: TaskInfo, ppo: PPOConfig, log: Callable[[str], None]) -> tuple[int, float, int]:
    """Train up to ``ppo.iterations`` iterations, stopping once the sampled mean return reaches
    ``ppo.target_return``; return (iterations run, last sampled mean return, env steps sampled)."""
    from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, EPISODE_RETURN_MEAN, NUM_ENV_STEPS_SAMPLED_LIFETIME

    mean_return, env_steps = float("nan"), 0
    for it in range(1, ppo.iterations + 1):
        result = algo.train()
        mean_return = float(result.get(ENV_RUNNER_RESULTS, {}).get(EPISODE_RETURN_MEAN, float("nan")))
        env_steps = int(result.get(NUM_ENV_STEPS_SAMPLED_LIFETIME, 0))
        log(f"{info.name} ppo iter {it}/{ppo.iterations}: mean return {mean_return:.2f}, env steps {env_steps}")
        if ppo.target_return is not None and mean_return >= ppo.target_return:
            break
    return it, mean_return, env_steps
