"""bench/babyai_front.py: states are grouped by what stands in front of the agent, and a policy's P(forward)
is read over the level's legal actions."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest
from minigrid.core.actions import Actions

from mugato_ray import envs
from mugato_ray.tasks import get_task

BENCH = Path(__file__).resolve().parents[1] / "bench" / "babyai_front.py"
TASK = "BabyAI-GoToRedBall-v0"


@pytest.fixture(scope="module")
def bench():
    return runpy.run_path(str(BENCH), run_name="bench")


@pytest.fixture(scope="module")
def env():
    e = envs.make_env(get_task(TASK), None)
    yield e
    e.close()


def object_two_ahead(env) -> int:
    """A seed whose agent starts with an empty cell in front and an object in the cell after it."""
    for seed in range(500):
        env.reset(seed=seed)
        u = env.unwrapped
        if u.grid.get(*(u.agent_pos + u.dir_vec)) is not None:
            continue  # a wall or an object in front; the cell after it may be off the grid
        second = u.grid.get(*(u.agent_pos + 2 * u.dir_vec))
        if second is not None and second.type in ("key", "ball", "box"):
            return seed
    raise AssertionError("no seed of 500 starts with an object two cells ahead")


def test_the_group_follows_what_stands_in_front(bench, env):
    seed = object_two_ahead(env)
    env.reset(seed=seed)
    assert bench["front_group"](env) == "two ahead"
    env.step(int(Actions.forward))
    assert bench["front_group"](env) == "adjacent"
    before = tuple(env.unwrapped.agent_pos)
    env.step(int(Actions.forward))  # an adjacent object: forward does not move
    assert tuple(env.unwrapped.agent_pos) == before


def test_the_bot_never_walks_into_an_adjacent_object(bench, env):
    groups = bench["bot_states"](env, range(10_000, 10_060))
    assert set(groups) == set(bench["GROUPS"])
    assert len(groups["adjacent"]) > 0 and len(groups["two ahead"]) > 0
    assert all(a != bench["FORWARD"] for _, a in groups["adjacent"])
    assert any(a == bench["FORWARD"] for _, a in groups["two ahead"])


class FramePolicy:
    """Two envs; forward's logit is high where the frame's mean is odd, low where it is even; ids 0-6 legal,
    id 7 an illegal one with a big logit that must not count."""

    def reset(self, env_ids, seeds):
        assert list(env_ids) == [0, 1]

    def act_with_logits(self, obs):
        logits = np.zeros((2, 1, 8))
        logits[:, 0, 7] = 50.0
        for i in range(2):
            logits[i, 0, 2] = 20.0 if int(obs["image"][i].mean()) % 2 else -20.0
        return np.zeros((2, 1)), np.zeros((2, 1), np.int64), logits


def test_forward_probabilities_read_the_legal_actions(bench):
    def state(k, action):
        return {"direction": 0, "image": np.full((4, 4, 3), k, np.uint8), "mission": "go to the red ball"}, action

    odd = [state(1, 0), state(3, 1), state(5, 2)]  # 3 states: the last one is left out (pairs)
    r = bench["forward_probabilities"](FramePolicy(), odd, list(range(7)))
    assert r["states"] == 2 and r["bot_forward"] == 0.0
    assert r["p_forward"] > 0.99 and r["p_bot_action"] < 0.01
    # Even frames: forward near 0, the six other legal actions even (1/6 each), whatever the illegal id holds.
    r = bench["forward_probabilities"](FramePolicy(), [state(2, 0), state(4, 2)], list(range(7)))
    assert r["bot_forward"] == 0.5 and r["p_forward"] < 1e-6
    assert r["p_bot_action"] == pytest.approx((1 / 6 + 0) / 2, abs=1e-6)
    assert bench["forward_probabilities"](FramePolicy(), [], list(range(7)))["states"] == 0
