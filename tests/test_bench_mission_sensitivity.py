"""bench/mission_sensitivity.py: a policy that ignores its mission measures 0 under a mission swap, one that
reads it does not; the swaps change only what they name."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "mission_sensitivity.py"


@pytest.fixture(scope="module")
def bench():
    return runpy.run_path(str(BENCH), run_name="bench")


class FakePolicy:
    """Two envs; the first action's logits are a function of what ``reads`` names (frame, mission or both)."""

    def __init__(self, reads: set[str]):
        self.reads, self.resets, self.seen = reads, 0, []

    def reset(self, env_ids, seeds):
        assert list(env_ids) == [0, 1]
        self.resets += 1

    def act_with_logits(self, obs):
        self.seen.append(obs)
        logits = np.zeros((2, 1, 32))
        for i in range(2):  # the frame k raises id k, the mission of frame k raises id 16 + k
            if "frame" in self.reads:
                logits[i, 0, int(obs["image"][i].mean())] += 8.0
            if "mission" in self.reads:
                logits[i, 0, 15 + len(obs["mission"][i])] += 8.0
        return np.zeros((2, 1)), np.zeros((2, 1), np.int64), logits


def frames(n=12):
    # Distinct images (mean k) and missions of distinct lengths, so each swap changes what it names.
    return [{"direction": k % 4, "image": np.full((8, 8, 3), k, np.uint8), "mission": "x" * (k + 1)} for k in range(n)]


@pytest.mark.parametrize("reads", [{"frame"}, {"mission"}, {"frame", "mission"}])
def test_each_swap_moves_only_a_policy_that_reads_what_it_swaps(bench, reads):
    policy = FakePolicy(reads)
    r = bench["sensitivity"](policy, frames())
    assert r["frames"] == 12 and policy.resets == 24  # a fresh episode for each pair
    for name in ("mission", "frame"):
        if name in reads:  # alone it moves all the mass; with the other read, half of it
            assert r[f"tv_{name}"] > (0.95 if len(reads) == 1 else 0.45)
            if len(reads) == 1:
                assert r[f"same_greedy_{name}"] == 0.0
        else:
            assert r[f"tv_{name}"] == 0.0 and r[f"same_greedy_{name}"] == 1.0


def test_a_mission_swap_keeps_the_frame_and_a_frame_swap_keeps_the_mission(bench):
    policy = FakePolicy({"frame"})
    bench["sensitivity"](policy, frames(6))
    for k in range(0, len(policy.seen), 2):
        mission_swap, frame_swap = policy.seen[k], policy.seen[k + 1]
        assert np.array_equal(mission_swap["image"][0], mission_swap["image"][1])
        assert mission_swap["mission"][0] != mission_swap["mission"][1]
        assert frame_swap["mission"][0] == frame_swap["mission"][1]
        assert not np.array_equal(frame_swap["image"][0], frame_swap["image"][1])


def test_partners_have_another_mission_and_one_mission_everywhere_is_an_error(bench):
    rng = np.random.default_rng(0)
    missions = ["a", "a", "b", "c", "b"]
    for i, j in enumerate(bench["partners"](missions, rng)):
        assert missions[j] != missions[i]
    with pytest.raises(ValueError, match="same mission"):
        bench["partners"](["a", "a"], rng)


KINDS = ["ball", "box", "key"]


class FakePickupPolicy:
    """Seven actions; pickup (3) is likely iff the mission names the kind the frame shows (``image`` mean k ->
    KINDS[k]), or always with ``blind``."""

    def __init__(self, blind: bool):
        self.blind = blind

    def reset(self, env_ids, seeds):
        pass

    def act_with_logits(self, obs):
        logits = np.zeros((2, 1, 7))
        for i in range(2):
            shown = KINDS[int(obs["image"][i].mean())]
            logits[i, 0, 3 if self.blind or shown in obs["mission"][i] else 0] = 8.0
        return np.zeros((2, 1)), np.zeros((2, 1), np.int64), logits


def pickup_frames_of(n=9):
    return [({"direction": 0, "image": np.full((8, 8, 3), k % 3, np.uint8), "mission": f"pick up the {KINDS[k % 3]}"},
             KINDS[k % 3]) for k in range(n)]


@pytest.mark.parametrize("blind", [False, True])
def test_pickup_discrimination_separates_a_policy_that_reads_the_type_from_one_that_does_not(bench, blind):
    r = bench["pickup_discrimination"](FakePickupPolicy(blind), pickup_frames_of(), list(range(7)))
    assert r["pickup_frames"] == 8  # pairs of frames
    assert r["p_pickup_own"] > 0.99
    if blind:
        assert r["p_pickup_other"] > 0.99
    else:
        assert r["p_pickup_other"] < 0.01


def test_the_bots_pickup_frames_face_the_named_type(bench):
    from minigrid.utils.baby_ai_bot import BabyAIBot

    from mugato_ray import envs
    from mugato_ray.tasks import get_task

    env = envs.make_env(get_task("BabyAI-PickupLoc-v0"), None)
    try:
        frames = bench["pickup_frames"](env, [5, 6, 7])
        assert len(frames) == 3
        for seed, (obs, kind) in zip([5, 6, 7], frames):
            # Walk the bot again to its pickup: the frame is that state's, and an object of the kind is in front.
            now, _ = env.reset(seed=seed)
            u = env.unwrapped
            bot = BabyAIBot(u)
            while (a := int(bot.replan())) != bench["PICKUP"]:
                now = env.step(a)[0]
            assert obs["mission"] == now["mission"] and np.array_equal(obs["image"], now["image"])
            assert u.grid.get(*u.front_pos).type == kind == u.instrs.desc.type
    finally:
        env.close()
