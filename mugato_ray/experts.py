"""Expert and random policies that act in a task's envs, and the PPO trainer for RLlib experts.

Every policy follows the acting protocol shared with the model policy and the rollout actor: all N envs
step in lockstep, ``reset(env_ids, seeds)`` is called whenever env i starts an episode with seed s, and
``act(observations)`` maps the batched flat observations (key -> (N, ...) array, or list[str]) of ALL N
envs to actions (N, *action_shape). Per-env randomness is seeded from the episode seed, so an episode's
result depends only on its seed, never on the batch slot that ran it.

Measured mean returns (``rollout.measure_returns``, seeds 0..99, 4 envs in lockstep; references.yaml holds
the rows, written by jobs/measure_references.py):

    task                  expert                                                expert    random
    CartPole-v1           bang-bang on 10*theta + 2*theta' + 0.1*x + 0.5*x'     500.0     22.3
    Acrobot-v1            torque along joint-2 velocity minus 0.25 joint-1's    -79.3     -498.6
    MountainCar-v0        push in the direction of the velocity                 -120.0    -200.0
    Pendulum-v1           energy-shaping swing-up, PD near the top              -147.0    -1203.3
    InvertedPendulum-v5   PD on (x, theta, x', theta'), gains (1, 10, 1, 1)     1000.0    5.2
    BabyAI GoToRedBall / GoToLocal / PickupLoc / OpenDoor: BabyAIBot, 100% success over these seeds,
                          returns 0.924 / 0.931 / 0.913 / 0.988 (random 0.142 / 0.205 / 0.045 / 0.177)

The BabyAI levels use minigrid's BabyAIBot, which plans on the env's full state (hence make_expert gets
the env objects). Atari experts are RLlib PPO checkpoints trained with ``train_ppo_expert``
(jobs/train_expert.py) at cluster scale and loaded by ``RLlibPolicy``.

The policies here only act; running them in envs (autoreset by seed, env-error handling, episode recording,
measuring returns) is ``rollout.RolloutWorker``'s job, the one rollout loop of the project.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from gymnasium import spaces

from mugato_ray.envs import make_env
from mugato_ray.tasks import TaskInfo, get_task

if TYPE_CHECKING:
    import gymnasium as gym

    from mugato_ray.config import Config, PPOConfig

Observations = dict[str, "np.ndarray | list[str]"]


class Policy(Protocol):
    """The acting protocol (see the module docstring)."""

    def reset(self, env_ids: Sequence[int], seeds: Sequence[int]) -> None: ...

    def act(self, observations: Observations) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------------
# Scripted controllers: pure functions of the batched observation "observation" (N, D) -> actions
# ---------------------------------------------------------------------------------------------


def cartpole(obs_Nx4: np.ndarray) -> np.ndarray:
    """Bang-bang on a linear state feedback: the pole angle dominates, the cart terms keep it centered."""
    x, x_dot, theta, theta_dot = obs_Nx4.T
    return (10.0 * theta + 2.0 * theta_dot + 0.1 * x + 0.5 * x_dot > 0).astype(np.int64)


def acrobot(obs_Nx6: np.ndarray) -> np.ndarray:
    """Energy pumping: torque (action 2 = +1, 0 = -1) along the joint-2 velocity, damped by joint 1's."""
    d_theta1, d_theta2 = obs_Nx6[:, 4], obs_Nx6[:, 5]
    return np.where(d_theta2 - 0.25 * d_theta1 > 0, 2, 0).astype(np.int64)


def mountaincar(obs_Nx2: np.ndarray) -> np.ndarray:
    """Push (action 2 = right, 0 = left) in the direction of the velocity: each swing adds energy."""
    return np.where(obs_Nx2[:, 1] >= 0, 2, 0).astype(np.int64)


def pendulum(obs_Nx3: np.ndarray) -> np.ndarray:
    """Energy-shaping swing-up, then PD near the top. Torque limit 2.

    Dynamics: theta'' = 15 sin(theta) + 3 u (theta = 0 up), so H = theta'^2 / 2 + 15 cos(theta) is conserved
    without torque and equals 15 at rest on top; pushing along theta' adds energy until H reaches 15.
    """
    cos, sin, theta_dot = obs_Nx3.T
    theta = np.arctan2(sin, cos)
    energy_gap = 15.0 - (0.5 * theta_dot**2 + 15.0 * cos)
    swing = 0.5 * energy_gap * np.where(theta_dot >= 0, 1.0, -1.0)
    balance = -(12.0 * theta + 3.0 * theta_dot)
    u = np.where(cos > 0.85, balance, swing)
    return np.clip(u, -2.0, 2.0)[:, None].astype(np.float32)


def inverted_pendulum(obs_Nx4: np.ndarray) -> np.ndarray:
    """PD on (cart x, pole angle, x', angle'); the positive cart gains pull the cart back to the center."""
    gains_4 = np.array([1.0, 10.0, 1.0, 1.0])
    return np.clip(obs_Nx4 @ gains_4, -3.0, 3.0)[:, None].astype(np.float32)


SCRIPTED: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "cartpole": cartpole,
    "acrobot": acrobot,
    "mountaincar": mountaincar,
    "pendulum": pendulum,
    "inverted_pendulum": inverted_pendulum,
}


class ScriptedPolicy:
    """A stateless controller from SCRIPTED applied to the batched "observation" field."""

    def __init__(self, controller: Callable[[np.ndarray], np.ndarray]):
        self.controller = controller

    def reset(self, env_ids: Sequence[int], seeds: Sequence[int]) -> None:
        pass  # stateless and deterministic

    def act(self, observations: Observations) -> np.ndarray:
        return self.controller(np.asarray(observations["observation"], dtype=np.float64))


# ---------------------------------------------------------------------------------------------
# BabyAI bot, random and RLlib policies
# ---------------------------------------------------------------------------------------------


class BabyAIBotPolicy:
    """minigrid's BabyAIBot per env, rebuilt on reset (it plans on the env's full state, not the observation)."""

    def __init__(self, envs: Sequence[gym.Env]):
        self.envs = list(envs)
        self.bots: list[Any] = [None] * len(self.envs)

    def reset(self, env_ids: Sequence[int], seeds: Sequence[int]) -> None:
        from minigrid.utils.baby_ai_bot import BabyAIBot

        for i in env_ids:
            self.bots[i] = BabyAIBot(self.envs[i].unwrapped)

    def act(self, observations: Observations) -> np.ndarray:
        missing = [i for i, bot in enumerate(self.bots) if bot is None]
        if missing:
            raise RuntimeError(f"BabyAIBotPolicy.act: envs {missing} were never reset (call reset(env_ids, seeds))")
        # The bot assumes its previous suggestion was taken; the rollout takes it (idle slots ignore it).
        return np.array([int(bot.replan()) for bot in self.bots], dtype=np.int64)


# Mixed into the episode seed so that the policy's random stream differs from the env's own (seeded with
# the same integer).
_RANDOM_POLICY_SALT = 0x52414E44


class RandomPolicy:
    """Uniform actions from the action space; env i's stream is seeded from its episode seed in ``reset``."""

    def __init__(self, action_space: spaces.Space, num_envs: int):
        self.action_space = action_space
        self.spaces: list[spaces.Space | None] = [None] * num_envs

    def reset(self, env_ids: Sequence[int], seeds: Sequence[int]) -> None:
        for i, seed in zip(env_ids, seeds, strict=True):
            space = copy.deepcopy(self.action_space)
            space.seed(int(np.random.SeedSequence([int(seed), _RANDOM_POLICY_SALT]).generate_state(1)[0]))
            self.spaces[i] = space

    def act(self, observations: Observations) -> np.ndarray:
        missing = [i for i, s in enumerate(self.spaces) if s is None]
        if missing:
            raise RuntimeError(f"RandomPolicy.act: envs {missing} were never reset (call reset(env_ids, seeds))")
        return np.stack([np.asarray(s.sample()) for s in self.spaces])


def rllib_observation(obs: np.ndarray) -> np.ndarray:
    """What the RLlib module sees: uint8 images scaled to [-1, 1] (RLlib's NormalizedImageEnv), else float32."""
    obs = np.asarray(obs)
    if obs.dtype == np.uint8:
        return obs.astype(np.float32) / 128.0 - 1.0
    return obs.astype(np.float32)


def rllib_module_dir(checkpoint_dir: str | Path) -> Path:
    """The RLModule folder of an Algorithm checkpoint (learner_group/learner/rl_module/<module id>), or the
    folder itself if it already is an RLModule checkpoint."""
    from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_LEARNER_GROUP, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID

    root = Path(checkpoint_dir)
    module_dir = root / COMPONENT_LEARNER_GROUP / COMPONENT_LEARNER / COMPONENT_RL_MODULE / DEFAULT_MODULE_ID
    if module_dir.is_dir():
        return module_dir
    if (root / "class_and_ctor_args.pkl").is_file():
        return root
    raise FileNotFoundError(f"{root}: not an RLlib Algorithm or RLModule checkpoint (no {module_dir})")


class RLlibPolicy:
    """Greedy actions (argmax / Gaussian mean) of an RLlib new-API-stack RLModule checkpoint.

    The checkpoint holds pickled class info (RLlib's format): load only checkpoints this project wrote.
    """

    def __init__(self, checkpoint_dir: str | Path, num_envs: int):
        import torch
        from ray.rllib.core.rl_module.rl_module import RLModule

        self.num_envs = num_envs
        self.module = RLModule.from_checkpoint(rllib_module_dir(checkpoint_dir))
        self.module.eval()
        self._dist_cls = self.module.get_inference_action_dist_cls()
        self._torch = torch

    def reset(self, env_ids: Sequence[int], seeds: Sequence[int]) -> None:
        pass  # greedy: deterministic

    def act(self, observations: Observations) -> np.ndarray:
        from ray.rllib.core import Columns

        if set(observations) != {"observation"}:
            raise ValueError(
                f"RLlibPolicy acts on a single 'observation' field, got {sorted(observations)} (Dict observations "
                "are not supported by the PPO experts)"
            )
        obs_NxD = self._torch.from_numpy(rllib_observation(observations["observation"]))
        with self._torch.no_grad():
            out = self.module.forward_inference({Columns.OBS: obs_NxD})
            dist = self._dist_cls.from_logits(out[Columns.ACTION_DIST_INPUTS])
            actions = dist.to_deterministic().sample().cpu().numpy()
        space = self.module.action_space
        if isinstance(space, spaces.Box):
            return np.clip(actions, space.low, space.high).astype(space.dtype)
        return actions.astype(space.dtype)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------

EXPERT_KINDS = ("babyai_bot", "scripted", "rllib", "none")


def parse_expert(expert: str, where: str = "") -> tuple[str, str | None]:
    """``"babyai_bot"`` | ``"scripted:<name>"`` | ``"rllib:<dir>"`` | ``"none"`` -> (kind, arg)."""
    kind, sep, arg = expert.partition(":")
    if kind not in EXPERT_KINDS or bool(sep) != (kind in ("scripted", "rllib")) or (sep and not arg):
        raise ValueError(
            f"{where}: bad expert {expert!r}; expected 'babyai_bot', 'scripted:<name>', "
            "'rllib:<checkpoint dir>' or 'none'"
        )
    if kind == "scripted" and arg not in SCRIPTED:
        raise ValueError(f"{where}: unknown scripted expert {arg!r}; known: {sorted(SCRIPTED)}")
    return kind, (arg if sep else None)


def make_expert(task: TaskInfo | str, envs: Sequence[gym.Env]) -> Policy:
    """The task's expert policy over ``envs`` (the N envs it will act in)."""
    info = get_task(task)
    kind, arg = parse_expert(info.expert, f"task {info.name!r}")
    if kind == "babyai_bot":
        return BabyAIBotPolicy(envs)
    if kind == "scripted":
        return ScriptedPolicy(SCRIPTED[arg])
    if kind == "rllib":
        return RLlibPolicy(arg, len(envs))
    raise ValueError(
        f"task {info.name!r} has no expert (expert='none'); train one with jobs/train_expert.py and register it "
        "as expert='rllib:<checkpoint dir>'"
    )


# ---------------------------------------------------------------------------------------------
# PPO experts (RLlib new API stack)
# ---------------------------------------------------------------------------------------------


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
