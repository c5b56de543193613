"""Expert and random policies that act in a task's envs (``mugato_ray.ppo`` trains RLlib experts).

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
    InvertedDoublePendulum-v5
                          LQR of the linearized MuJoCo model, Q = I, R = 1      9359.9    48.0
    Reacher-v5            IK to the target, then joint PD (kp 0.3, kd 0.05)     -3.55     -43.3
    BabyAI GoToRedBall / GoToLocal / PickupLoc / OpenDoor: BabyAIBot, 100% success over these seeds,
                          returns 0.924 / 0.931 / 0.913 / 0.988 (random 0.142 / 0.205 / 0.045 / 0.177)
    BabyAI GoToDoor / PickupDist / PutNextLocal / GoToObj / UnlockLocal: BabyAIBot, 100% success,
                          returns 0.989 / 0.904 / 0.916 / 0.929 / 0.978
                          (random 0.467 / 0.088 / 0.008 / 0.135 / 0.006)
    ALE/Pong-v5           RAM controller (atari_experts.py), seeds 0..19        16.7      -20.5
    ALE/Breakout-v5       RAM controller (atari_experts.py), seeds 0..19        374.85    1.25

Every expert episode of these seeds meets its task's success criterion (tasks.py); the two MuJoCo additions'
random policies meet theirs in 0 and 2 of 100.

The BabyAI levels use minigrid's BabyAIBot, which plans on the env's full state (hence make_expert gets
the env objects). The Atari experts (``"atari_ram:<game>"``, ``atari_experts.AtariRAMPolicy``) likewise read
the emulator's RAM of the envs they act in: the paddle and ball positions, not the 84x84 frame the model
sees; no GPU and no training. A task with no scripted expert can take an RLlib PPO checkpoint trained with
``ppo.train_ppo_expert`` (jobs/train_expert.py) and loaded by ``RLlibPolicy`` (``"rllib:<dir>"``).

The policies here only act; running them in envs (autoreset by seed, env-error handling, episode recording,
measuring returns) is ``rollout.RolloutWorker``'s job, the one rollout loop of the project.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from gymnasium import spaces

from mugato_ray.atari_experts import RAM_CONTROLLERS, AtariRAMPolicy  # Atari: RAM-reading experts
from mugato_ray.tasks import TaskInfo, get_task

if TYPE_CHECKING:
    import gymnasium as gym


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


# LQR gain of InvertedDoublePendulum-v5 on the state (x, theta1, theta2, x', theta1', theta2'), u = -K s.
# Derived (tests/test_experts.py::double_pendulum_lqr_gain re-derives it and checks these numbers): the env's
# own MuJoCo model is linearized around the upright rest state by central finite differences of one control
# step (frame_skip=5 mj_steps, dt=0.05 s), s' = A s + B u, and the discrete Riccati recursion is iterated to
# convergence with Q = I (6x6), R = 1. The closed loop A - B K has spectral radius 0.95.
DOUBLE_PENDULUM_LQR_GAIN = np.array([0.088097, 0.957036, 4.400306, 0.177663, 0.603435, 0.661274])


def inverted_double_pendulum(obs_Nx9: np.ndarray) -> np.ndarray:
    """LQR state feedback (DOUBLE_PENDULUM_LQR_GAIN) clipped to the action range [-1, 1].

    v5 observation: x, sin(theta1), sin(theta2), cos(theta1), cos(theta2), x', theta1', theta2' (velocities
    clipped to +-10), then a constraint force the controller ignores; theta2 is relative to pole 1.
    """
    x, sin1, sin2, cos1, cos2, x_dot, theta1_dot, theta2_dot = obs_Nx9[:, :8].T
    state_Nx6 = np.stack([x, np.arctan2(sin1, cos1), np.arctan2(sin2, cos2), x_dot, theta1_dot, theta2_dot], 1)
    return np.clip(-(state_Nx6 @ DOUBLE_PENDULUM_LQR_GAIN), -1.0, 1.0)[:, None].astype(np.float32)


# Reacher-v5's arm (reacher.xml): shoulder to elbow 0.1 m, elbow to fingertip 0.11 m.
REACHER_LINKS = (0.1, 0.11)


def reacher(obs_Nx10: np.ndarray) -> np.ndarray:
    """Inverse kinematics of the 2-link arm to the target, then a PD torque per joint, clipped to [-1, 1].

    v5 observation: cos(q0), cos(q1), sin(q0), sin(q1), target x, y (relative to the shoulder), q0', q1',
    fingertip - target (x, y). Of the two elbow solutions the one nearer in |dq0| + |dq1| is taken. The joints
    are almost decoupled (armature 1 dominates the link inertia, damping 1, gear 200), so each is
    q'' ~ 200 a - q': kp = 0.3, kd = 0.05 give w_n = 7.7 rad/s, damping ratio 0.71. The gains were tuned on
    seeds 0..49 against the return, whose control cost |a|^2 per step weighs as much as the distance.
    """
    l1, l2 = REACHER_LINKS
    cos0, cos1, sin0, sin1, tx, ty, q0_dot, q1_dot = obs_Nx10[:, :8].T
    q0, q1 = np.arctan2(sin0, cos0), np.arctan2(sin1, cos1)
    # Law of cosines for the elbow angle; targets out of reach (never, in Reacher) stretch the arm toward them.
    elbow = np.arccos(np.clip((tx**2 + ty**2 - l1**2 - l2**2) / (2 * l1 * l2), -1.0, 1.0))
    errors = []
    for q1_goal in (elbow, -elbow):
        q0_goal = np.arctan2(ty, tx) - np.arctan2(l2 * np.sin(q1_goal), l1 + l2 * np.cos(q1_goal))
        err0 = np.angle(np.exp(1j * (q0_goal - q0)))  # the shoulder turns freely: shortest way round
        errors.append((err0, q1_goal - q1))  # the elbow is limited to [-3, 3]: no wrap
    (a0, a1), (b0, b1) = errors
    first = np.abs(a0) + np.abs(a1) <= np.abs(b0) + np.abs(b1)
    err_Nx2 = np.stack([np.where(first, a0, b0), np.where(first, a1, b1)], 1)
    torque_Nx2 = 0.3 * err_Nx2 - 0.05 * np.stack([q0_dot, q1_dot], 1)
    return np.clip(torque_Nx2, -1.0, 1.0).astype(np.float32)


SCRIPTED: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "cartpole": cartpole,
    "acrobot": acrobot,
    "mountaincar": mountaincar,
    "pendulum": pendulum,
    "inverted_pendulum": inverted_pendulum,
    "inverted_double_pendulum": inverted_double_pendulum,
    "reacher": reacher,
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
        self.taken: list[int | None] = [None] * len(self.envs)
        self.failures: dict[int, str] = {}

    def reset(self, env_ids: Sequence[int], seeds: Sequence[int]) -> None:
        from minigrid.utils.baby_ai_bot import BabyAIBot

        for i in env_ids:
            self.bots[i] = BabyAIBot(self.envs[i].unwrapped)
            self.taken[i] = None

    def observe_executed(self, actions: np.ndarray) -> None:
        """The actions the envs executed (the rollout tells every policy that has this method): the bot
        replans from them, so it can label the states of a trajectory that another policy drives (DAgger)."""
        self.taken = [int(a) for a in np.asarray(actions).reshape(len(self.envs))]

    def act(self, observations: Observations) -> np.ndarray:
        missing = [i for i, bot in enumerate(self.bots) if bot is None]
        if missing:
            raise RuntimeError(f"BabyAIBotPolicy.act: envs {missing} were never reset (call reset(env_ids, seeds))")
        # With no executed action observed (None) the bot assumes its previous suggestion was taken.
        actions = np.zeros(len(self.bots), np.int64)
        for i, (bot, taken) in enumerate(zip(self.bots, self.taken)):
            try:
                actions[i] = int(bot.replan(taken))
            except Exception as e:  # noqa: BLE001 - e.g. DisappearedBoxError after another policy opened a box
                self.failures[i] = f"the BabyAI bot cannot act: {type(e).__name__}: {e}"
        return actions

    def take_failures(self) -> dict[int, str]:
        """Envs the bot could not act in since the last call (their episodes are lost), and why."""
        failures, self.failures = self.failures, {}
        return failures


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

EXPERT_KINDS = ("babyai_bot", "scripted", "atari_ram", "rllib", "none")
_KINDS_WITH_ARG = ("scripted", "atari_ram", "rllib")


def parse_expert(expert: str, where: str = "") -> tuple[str, str | None]:
    """``"babyai_bot"`` | ``"scripted:<name>"`` | ``"atari_ram:<game>"`` | ``"rllib:<dir>"`` | ``"none"`` ->
    (kind, arg)."""
    kind, sep, arg = expert.partition(":")
    if kind not in EXPERT_KINDS or bool(sep) != (kind in _KINDS_WITH_ARG) or (sep and not arg):
        raise ValueError(
            f"{where}: bad expert {expert!r}; expected 'babyai_bot', 'scripted:<name>', 'atari_ram:<game>', "
            "'rllib:<checkpoint dir>' or 'none'"
        )
    if kind == "scripted" and arg not in SCRIPTED:
        raise ValueError(f"{where}: unknown scripted expert {arg!r}; known: {sorted(SCRIPTED)}")
    if kind == "atari_ram" and arg not in RAM_CONTROLLERS:
        raise ValueError(f"{where}: unknown Atari RAM expert {arg!r}; known: {sorted(RAM_CONTROLLERS)}")
    return kind, (arg if sep else None)


def make_expert(task: TaskInfo | str, envs: Sequence[gym.Env]) -> Policy:
    """The task's expert policy over ``envs`` (the N envs it will act in)."""
    info = get_task(task)
    kind, arg = parse_expert(info.expert, f"task {info.name!r}")
    if kind == "babyai_bot":
        return BabyAIBotPolicy(envs)
    if kind == "scripted":
        return ScriptedPolicy(SCRIPTED[arg])
    if kind == "atari_ram":
        return AtariRAMPolicy(envs, arg)
    if kind == "rllib":
        return RLlibPolicy(arg, len(envs))
    raise ValueError(
        f"task {info.name!r} has no expert (expert='none'); train one with jobs/train_expert.py and register it "
        "as expert='rllib:<checkpoint dir>'"
    )
