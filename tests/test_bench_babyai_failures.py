"""bench/babyai_failures.py: the replay that classifies how a BabyAI episode began and whether it recovered."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
from minigrid.core.actions import Actions

from mugato_ray import envs
from mugato_ray.config import config_from_dict
from mugato_ray.rollout import PolicySpec
from mugato_ray.tasks import get_task

BENCH = Path(__file__).resolve().parents[1] / "bench" / "babyai_failures.py"
TASK = "BabyAI-PickupLoc-v0"


@pytest.fixture(scope="module")
def bench():
    return runpy.run_path(str(BENCH), run_name="bench")


@pytest.fixture(scope="module")
def env():
    e = envs.make_env(get_task(TASK), None)
    yield e
    e.close()


def walk_to_a_wrong_object(env) -> tuple[int, list[int]]:
    """A seed and the forward moves after which the agent faces a pickable object the mission does not name."""
    for seed in range(500):
        env.reset(seed=seed)
        u = env.unwrapped
        for k in range(1, 4):  # the object k cells ahead, nothing in between
            cells = [u.grid.get(*(u.agent_pos + j * u.dir_vec)) for j in range(1, k + 1)]
            obj = cells[-1]
            if any(c is not None for c in cells[:-1]):
                break
            if obj is not None:
                if obj.can_pickup() and not any(obj is o for o in u.instrs.desc.obj_set):
                    return seed, [int(Actions.forward)] * (k - 1)
                break
    raise AssertionError("no seed of 500 starts with a wrong object straight ahead")


def test_a_wrong_pickup_is_classified_and_a_real_drop_is_seen(bench, env):
    seed, walk = walk_to_a_wrong_object(env)
    picked = bench["replay"](env, seed, [*walk, bench["PICKUP"]])
    assert picked["first_pickup"] == "wrong" and not picked["dropped"]
    # Dropping puts it back on the (now empty) cell in front: a real drop.
    assert bench["replay"](env, seed, [*walk, bench["PICKUP"], bench["DROP"]])["dropped"]
    # A drop with nothing carried is not one.
    assert not bench["replay"](env, seed, [*walk, bench["DROP"]])["dropped"]
    # Turning around only: nothing picked up.
    assert bench["replay"](env, seed, [int(Actions.left)] * 4)["first_pickup"] == "none"


def test_the_bots_episodes_replay_to_target_pickups(bench):
    cfg = config_from_dict({"tasks": [{"name": TASK, "episodes": 1}], "rollout": {"envs_per_actor": 2}})
    rows = bench["analyse"](cfg, TASK, PolicySpec("expert"), [10_000, 10_001, 10_002])
    assert [r["seed"] for r in rows] == [10_000, 10_001, 10_002]
    assert all(r["success"] and r["first_pickup"] == "target" and not r["dropped"] for r in rows)
    text = bench["summary"](rows)
    assert text.startswith("success 3/3;") and "wrong 0" in text


def test_a_wrong_pickup_names_what_it_got_wrong(bench):
    """Type, then colour, then (both right) location: the first attribute of the mission the object misses."""
    from minigrid.core.world_object import Ball, Key
    from minigrid.envs.babyai.core.verifier import ObjDesc

    kind = bench["wrong_kind"]
    assert kind(ObjDesc("ball", "red"), Key("red")) == "type"
    assert kind(ObjDesc("ball", "red"), Ball("blue")) == "colour"
    assert kind(ObjDesc("ball", "red", "left"), Ball("red")) == "location"
    assert kind(ObjDesc("ball", None, "left"), Ball("blue")) == "location"  # "a ball on your left": any colour


def test_the_mission_location_is_read_from_the_level(bench, env):
    seen = set()
    for seed in range(200):
        env.reset(seed=seed)
        loc = env.unwrapped.instrs.desc.loc
        row = bench["replay"](env, seed, [])
        assert row["loc"] is (loc is not None) and row["wrong_kind"] is None
        seen.add(row["loc"])
        if seen == {True, False}:
            break
    assert seen == {True, False}  # PickupLoc has missions with a location and without


def test_forward_actions_that_do_not_move_are_counted_by_what_blocks_them(bench, env):
    seed, walk = walk_to_a_wrong_object(env)
    forward = int(Actions.forward)
    row = bench["replay"](env, seed, [*walk, forward, forward, forward])  # now facing the object: 3 blocked
    assert (row["blocked_object"], row["blocked_wall"]) == (3, 0)
    # What the object it pressed into shares with the mission's target.
    env.reset(seed=seed)
    u = env.unwrapped
    obj = u.grid.get(*(u.agent_pos + (len(walk) + 1) * u.dir_vec))
    assert row["blocker_kind"] == bench["resemblance"](u.instrs.desc, obj)
    assert bench["replay"](env, seed, walk)["blocked_object"] == 0  # the walk itself moved every time
    assert bench["replay"](env, seed, walk)["blocker_kind"] is None
    # Walk until a wall stops the agent: every blocked forward after that is the wall's.
    env.reset(seed=seed)
    u = env.unwrapped
    env.step(int(Actions.left))
    env.step(int(Actions.left))  # facing away from the object
    moves = 0
    while u.grid.get(*u.front_pos) is None:
        env.step(forward)
        moves += 1
    front = u.grid.get(*u.front_pos)
    row = bench["replay"](env, seed, [int(Actions.left)] * 2 + [forward] * (moves + 10))
    if front.type == "wall":
        assert (row["blocked_object"], row["blocked_wall"]) == (0, 10)
    else:
        assert (row["blocked_object"], row["blocked_wall"]) == (10, 0)


def test_a_failure_stuck_against_an_object_is_summarized(bench):
    base = {"in_view": True, "first_pickup": "none", "dropped": False, "loc": False, "wrong_kind": None,
            "others": ["colour", "neither", "neither", "type"]}
    rows = [{**base, "success": False, "blocked_object": bench["STUCK"], "blocked_wall": 0, "blocker_kind": "colour"},
            {**base, "success": False, "blocked_object": 1, "blocked_wall": bench["STUCK"] - 2,
             "blocker_kind": "type"},  # not stuck: not counted
            {**base, "success": True, "blocked_object": 0, "blocked_wall": 0, "blocker_kind": None}]
    text = bench["summary"](rows)
    assert f"failures stuck pressing forward (>= {bench['STUCK']} blocked): 1/2" in text
    assert f"against an object {bench['STUCK']}, a wall or door 0" in text
    assert "colour 1 (25%), type 0 (25%), both 0 (0%), neither 0 (50%)" in text


def test_resemblance_names_what_an_object_shares_with_the_mission(bench):
    from minigrid.core.world_object import Ball, Box, Key
    from minigrid.envs.babyai.core.verifier import ObjDesc

    same = bench["resemblance"]
    assert same(ObjDesc("ball", "red"), Key("red")) == "colour"
    assert same(ObjDesc("ball", "red"), Ball("blue")) == "type"
    assert same(ObjDesc("ball", "red"), Box("grey")) == "neither"
    assert same(ObjDesc("ball", "red", "left"), Ball("red")) == "both"
    assert same(ObjDesc("ball", None), Ball("blue")) == "type"  # "a ball": no colour to share
