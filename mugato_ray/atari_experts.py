"""Atari experts that read the emulator's RAM: no GPU, no training (``expert="atari_ram:<game>"``).

The model sees the task's 84x84 frame; the expert reads the paddle and ball positions from the RAM of the
env it acts in (``env.unwrapped.ale.getRAM()``; the addresses of AtariARI's RAM annotations, checked against
the screen by tests/test_atari_experts.py), predicts where the ball will cross the paddle's line (wall
bounces included) and steers the paddle there with a small model-predictive controller.

The env stays as registered: ALE v5 defaults, frameskip 4 and sticky actions (each frame repeats the previous
action with probability 0.25). The paddle is a paddle controller: an action moves it ~22 px per agent step,
and it keeps moving a step after the action ends, so a controller that pushes toward the target overshoots.
The controller models that (``PaddleModel``, fitted on random actions under sticky actions), tries every
sequence of three actions, and takes the first action of the sequence that brings the paddle to the target
soonest and stops it there, re-planning every step.

Measured over seeds 0..19 (references.yaml; full v5 episodes): Pong +16.7 (std 2.4; random -20.5),
Breakout 374.85 (std 102; random 1.25).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import gymnasium as gym


# ---------------------------------------------------------------------------------------------
# Paddle control
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaddleModel:
    """Per agent step: ``dp' = carry * dp + now * u + then * u_prev + bias`` and ``p' = clip(p + dp', low,
    high)``, with u in {-1, 0, +1} the direction pushed this step and u_prev the previous step's. Least
    squares on random actions under sticky actions (residual std ~2-3 px)."""

    carry: float
    now: float
    then: float
    bias: float
    low: float
    high: float
    horizon: int
    """Steps over which a plan is scored; a target further away is approached and the paddle stopped by then."""


_SEQUENCES_Kx3 = np.array(list(itertools.product((-1.0, 0.0, 1.0), repeat=3)))


def plan_paddle(model: PaddleModel, p: float, dp: float, u_prev: int, target: float, steps: int) -> int:
    """The direction (-1, 0, +1) to push now: the first of the three-step sequence (then no push) whose
    paddle is at ``target`` after ``steps`` steps, reaches it early (running cost) and uses few pushes."""
    seqs = _SEQUENCES_Kx3
    n = int(np.clip(steps, 1, model.horizon))
    pos = np.full(len(seqs), float(p))
    vel = np.full(len(seqs), float(dp))
    prev = np.full(len(seqs), float(u_prev))
    running = np.zeros(len(seqs))
    for k in range(n):
        u = seqs[:, k] if k < seqs.shape[1] else np.zeros(len(seqs))
        vel = model.carry * vel + model.now * u + model.then * prev + model.bias
        pos = np.clip(pos + vel, model.low, model.high)
        prev = u
        running += (pos - target) ** 2
    cost = 0.1 * running + (pos - target) ** 2 + 0.5 * np.abs(seqs).sum(1)
    if steps > model.horizon:
        cost += 4.0 * vel**2  # not there yet: arrive at rest
    return int(seqs[np.argmin(cost), 0])


# ---------------------------------------------------------------------------------------------
# Pong: the player's paddle is the right one and moves vertically
# ---------------------------------------------------------------------------------------------

PONG_BALL_X, PONG_BALL_Y, PONG_PLAYER_Y, PONG_ENEMY_Y = 49, 54, 51, 50
"""RAM addresses (AtariARI). ram[49] == 0 while no ball is in play (between points)."""
PONG_UP, PONG_DOWN, PONG_NOOP = 2, 3, 0
"""Action ids: RIGHT moves the paddle up (y decreases), LEFT down."""
PONG_PADDLE = PaddleModel(carry=0.245, now=8.79, then=8.41, bias=0.1, low=38.0, high=203.0, horizon=10)
PONG_CONTACT_X = 188.0
"""Ball x (RAM units) where it meets the player's paddle."""
PONG_WALLS = (45.0, 206.0)
"""The ball turns once its y reaches 45 or less (top) or 206 or more (bottom), frame by frame."""
PONG_CONTACT_OFFSET = 2.0
"""Ball y minus paddle y (RAM units) to meet the ball with. The paddle catches it for offsets -2..16; the
offset decides the return angle: 5..8 return it flat, which the CPU returns for ever (episodes then run into
the 27,000-step limit); 1..4 return it upward at the middle speed: points end sooner. Measured on seeds 0..5:
offset 6 scored +14.8 a game with every episode truncated at 27,000 steps; offset 2 scores +16.7 on seeds
0..19, in episodes of ~7,000-9,000 steps on average. Nearer the paddle's end (-2..0: the steepest return)
the paddle, placed to a few pixels under sticky actions, misses too often."""


def pong_ball_y(y: float, v: float, frames: float) -> tuple[float, float]:
    """Ball y and y-speed after ``frames`` frames at ``v`` px/frame, bouncing as the ROM does: once y reaches a
    wall the speed flips and the ball moves back by its speed plus one pixel on the next frame."""
    top, bottom = PONG_WALLS
    for _ in range(16):  # a few bounces at most over the field
        if frames <= 0 or v == 0:
            break
        k = max(0.0, np.ceil((bottom - y) / v if v > 0 else (y - top) / -v))
        if k >= frames:
            return y + v * frames, v
        y, frames, v = y + v * k, frames - k, -v
        y += v + np.sign(v)
        frames -= 1
    return y, v


class PongController:
    """One env's Pong player (state: the previous ball and paddle positions, the last push)."""

    def __init__(self):
        self.prev_ball: tuple[int, int] | None = None
        self.prev_paddle: int | None = None
        self.vy: float | None = None  # ball y px per agent step (4 frames)
        self.u_prev = 0

    def _track(self, x: int, y: int) -> int | None:
        """Ball x speed per step, and ``self.vy`` (kept through a wall bounce inside the step); None: no ball."""
        prev, self.prev_ball = self.prev_ball, ((x, y) if x else None)
        if not x or prev is None:
            self.vy = None
            return None
        if self.vy is not None:
            y_pred, v = pong_ball_y(prev[1], self.vy / 4, 4)
            if abs(y_pred - y) <= 1:
                self.vy = 4 * v
                return x - prev[0]
        self.vy = float(y - prev[1])  # the first step of a flight (or a paddle hit): measured
        return x - prev[0]

    def act(self, ram: np.ndarray) -> int:
        x, y, p = int(ram[PONG_BALL_X]), int(ram[PONG_BALL_Y]), int(ram[PONG_PLAYER_Y])
        dp = 0 if self.prev_paddle is None else p - self.prev_paddle
        self.prev_paddle = p
        vx = self._track(x, y)
        target, steps = 125.0, PONG_PADDLE.horizon + 1  # no ball: wait in the middle
        if vx is not None and vx > 0 and x <= PONG_CONTACT_X:  # coming: meet it where it will cross
            steps_to_contact = (PONG_CONTACT_X - x) / vx
            target = pong_ball_y(y, self.vy / 4, 4 * steps_to_contact)[0]
            steps = int(np.ceil(steps_to_contact))
        elif x:
            target = y  # going away: follow it
        u = plan_paddle(PONG_PADDLE, p, dp, self.u_prev, target - PONG_CONTACT_OFFSET, steps)
        self.u_prev = u
        return PONG_DOWN if u > 0 else PONG_UP if u < 0 else PONG_NOOP

    def executed(self, action: int) -> None:
        self.u_prev = 1 if action in (PONG_DOWN, 5) else -1 if action in (PONG_UP, 4) else 0


# ---------------------------------------------------------------------------------------------
# Breakout: the paddle moves horizontally at the bottom
# ---------------------------------------------------------------------------------------------

BREAKOUT_BALL_X, BREAKOUT_BALL_Y, BREAKOUT_PADDLE_X = 99, 101, 72
"""RAM addresses (AtariARI). ram[101] == 0 while no ball is in play (before FIRE launches one)."""
BREAKOUT_NOOP, BREAKOUT_FIRE, BREAKOUT_RIGHT, BREAKOUT_LEFT = 0, 1, 2, 3
BREAKOUT_PADDLE = PaddleModel(carry=0.075, now=10.7, then=10.5, bias=0.0, low=55.0, high=191.0, horizon=8)
BREAKOUT_WALLS = (56.0, 200.5)
"""Ball x (RAM units) where the side walls reflect it."""
BREAKOUT_CONTACT_Y = 180.0
"""Ball y (RAM units, growing downward) where it meets the paddle; below ``+ 12`` it is lost."""
BREAKOUT_CENTER = 9.0
"""Ball x minus paddle x when the ball meets the middle of the (16 px) paddle: it overlaps for 1..17."""


def reflect(x: float, low: float, high: float) -> tuple[float, float]:
    """``x`` folded into [low, high] by mirror bounces, and the direction factor (+1 or -1) it ends with."""
    span = high - low
    z = (x - low) % (2 * span)
    return (low + z, 1.0) if z <= span else (low + 2 * span - z, -1.0)


class BreakoutController:
    """One env's Breakout player (state: the previous ball and paddle positions, the last push)."""

    def __init__(self):
        self.prev_ball: tuple[int, int] | None = None
        self.prev_paddle: int | None = None
        self.vx: float | None = None  # ball x px per agent step
        self.u_prev = 0

    def _track(self, x: int, y: int) -> int | None:
        """Ball y speed per step, and ``self.vx`` (kept through a wall bounce inside the step); None: no ball."""
        prev, self.prev_ball = self.prev_ball, ((x, y) if y else None)
        if not y or prev is None:
            self.vx = None
            return None
        if self.vx is not None:
            x_pred, direction = reflect(prev[0] + self.vx, *BREAKOUT_WALLS)
            if abs(x_pred - x) <= 1:
                self.vx *= direction
                return y - prev[1]
        self.vx = float(x - prev[0])
        return y - prev[1]

    def act(self, ram: np.ndarray) -> int:
        x, y, p = int(ram[BREAKOUT_BALL_X]), int(ram[BREAKOUT_BALL_Y]), int(ram[BREAKOUT_PADDLE_X])
        dp = 0 if self.prev_paddle is None else p - self.prev_paddle
        self.prev_paddle = p
        vy = self._track(x, y)
        if not y or y >= BREAKOUT_CONTACT_Y + 12:
            self.u_prev = 0
            return BREAKOUT_FIRE  # no ball in play (a new life, or the episode's start): launch one
        target, steps = float(x), BREAKOUT_PADDLE.horizon + 1  # going up: stay under it
        if vy is not None and vy > 0 and y <= BREAKOUT_CONTACT_Y:  # coming down: meet it where it will cross
            steps_to_contact = (BREAKOUT_CONTACT_Y - y) / vy
            target = reflect(x + self.vx * steps_to_contact, *BREAKOUT_WALLS)[0]
            steps = int(np.ceil(steps_to_contact))
        u = plan_paddle(BREAKOUT_PADDLE, p, dp, self.u_prev, target - BREAKOUT_CENTER, steps)
        self.u_prev = u
        return BREAKOUT_RIGHT if u > 0 else BREAKOUT_LEFT if u < 0 else BREAKOUT_NOOP

    def executed(self, action: int) -> None:
        self.u_prev = 1 if action == BREAKOUT_RIGHT else -1 if action == BREAKOUT_LEFT else 0


RAM_CONTROLLERS = {"pong": PongController, "breakout": BreakoutController}
"""``expert="atari_ram:<name>"``: the controller class of each game."""


class AtariRAMPolicy:
    """A RAM controller per env, rebuilt on reset (deterministic: an episode's actions depend only on its seed).

    It reads the RAM of the env objects it was given (the rollout's slots, which stay valid when an env is
    rebuilt), never the observation.
    """

    def __init__(self, envs: Sequence[gym.Env], game: str):
        if game not in RAM_CONTROLLERS:
            raise ValueError(f"unknown Atari RAM expert {game!r}; known: {sorted(RAM_CONTROLLERS)}")
        self.envs = list(envs)
        self.controller_cls = RAM_CONTROLLERS[game]
        self.controllers: list[PongController | BreakoutController | None] = [None] * len(self.envs)

    def reset(self, env_ids: Sequence[int], seeds: Sequence[int]) -> None:
        for i in env_ids:
            self.controllers[i] = self.controller_cls()

    def observe_executed(self, actions: np.ndarray) -> None:
        """The actions the envs executed (another policy may drive, as in DAgger): the paddle model needs the
        last push, not the one this policy suggested."""
        for controller, action in zip(self.controllers, np.asarray(actions).reshape(len(self.envs))):
            if controller is not None:
                controller.executed(int(action))

    def act(self, observations: dict) -> np.ndarray:
        missing = [i for i, c in enumerate(self.controllers) if c is None]
        if missing:
            raise RuntimeError(f"AtariRAMPolicy.act: envs {missing} were never reset (call reset(env_ids, seeds))")
        return np.array([c.act(env.unwrapped.ale.getRAM()) for c, env in zip(self.controllers, self.envs)],
                        dtype=np.int64)
