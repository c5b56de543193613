"""How a policy fails on BabyAI levels: was a target in view at the start, what did it pick up first.

    python bench/babyai_failures.py --config <run>/config.yaml --checkpoint <run>/snapshots/step_N/model.pt
        [--tasks BabyAI-PickupLoc-v0 ...] [--episodes 64] [--seed-offset 3100000] [--expert] [key=value ...]

Runs one episode per seed of each BabyAI task of the config (the model at each task's temperature, as
the evaluation job acts, or the task's bot with ``--expert``), then replays every episode's actions in a
fresh env with the same seed (minigrid is deterministic given the seed and the actions) and records:

- ``in_view``: whether an object the mission names is in the agent's first view (``agent_sees``);
- ``first_pickup``: "target", "wrong" or "none", the first object the agent picked up;
- ``dropped``: whether it ever dropped what it carried;
- ``loc``: whether the mission names a location relative to the agent's start ("the red ball on your
  left"), which a policy must remember once it has turned;
- ``wrong_kind``: what a wrong first pickup got wrong: "type" (not the named type), "colour" (the named type
  in another colour) or "location" (the named type and colour, elsewhere than the mission says);
- ``blocked_object``, ``blocked_wall``: how many of its ``forward`` actions did not move the agent, because an
  object (a key, ball or box) or a wall or closed door stood in front. A failure with at least ``STUCK`` of
  them is counted as stuck: the bot never walks into anything, so nothing in its demonstrations says what to
  do there, and a policy whose input then does not change can repeat ``forward`` to the step limit;
- ``blocker_kind``: what the object it pressed into most shares with the mission's target (:func:`resemblance`:
  its colour, its type, both, or neither), and ``others``: the same for every object of the level at the start
  that the mission does not name, the share a policy that walks into objects at random would show.

Prints per task: success with a target in the first view and without, with a location in the mission and
without, how the failures began, what the wrong pickups got wrong, and how many failures were stuck
pressing ``forward`` against an object or a wall, and what the objects they were stuck against share with the
target, beside those shares among all the levels' other objects (a policy that mistakes a red box for the red
ball would be stuck against the target's colour more often than red objects occur).
The seeds (``eval.seed_offset`` up, moved by ``--seed-offset``) must not be collection seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from minigrid.core.actions import Actions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from babyai_probe import OBJECTS, babyai_tasks  # noqa: E402

from mugato_ray import envs  # noqa: E402
from mugato_ray.config import load_config  # noqa: E402
from mugato_ray.evaluate import held_out_seeds  # noqa: E402
from mugato_ray.rollout import PolicySpec, RolloutWorker  # noqa: E402
from mugato_ray.tasks import get_task  # noqa: E402

PICKUP, DROP, FORWARD = int(Actions.pickup), int(Actions.drop), int(Actions.forward)
STUCK = 8
"""Blocked ``forward`` actions from which a failed episode counts as stuck."""


def replay(env, seed: int, actions) -> dict:
    """Replay ``actions`` from ``env.reset(seed=seed)``: the target's visibility at the start, the first pickup, drops."""
    env.reset(seed=seed)
    u = env.unwrapped
    desc = u.instrs.desc
    targets = desc.obj_set
    others = [o for o in u.grid.grid if o is not None and o.type in OBJECTS and not any(o is t for t in targets)]
    out = {"in_view": any(u.agent_sees(*o.cur_pos) for o in targets), "first_pickup": "none", "dropped": False,
           "loc": desc.loc is not None, "wrong_kind": None, "blocked_object": 0, "blocked_wall": 0,
           "blocker_kind": None, "others": [resemblance(desc, o) for o in others]}
    blockers: Counter = Counter()
    for a in np.ravel(actions):
        carried_before = u.carrying
        pos_before, front = tuple(u.agent_pos), u.grid.get(*u.front_pos)
        env.step(int(a))
        if int(a) == FORWARD and tuple(u.agent_pos) == pos_before:
            on_object = front is not None and front.type in OBJECTS
            out["blocked_object" if on_object else "blocked_wall"] += 1
            if on_object:
                blockers[id(front)] += 1
                if blockers[id(front)] == max(blockers.values()):
                    out["blocker_kind"] = resemblance(desc, front)
        out["dropped"] |= int(a) == DROP and carried_before is not None and u.carrying is None
        if out["first_pickup"] == "none" and carried_before is None and u.carrying is not None:
            out["first_pickup"] = "target" if any(u.carrying is o for o in targets) else "wrong"
            if out["first_pickup"] == "wrong":
                out["wrong_kind"] = wrong_kind(desc, u.carrying)
    return out


def resemblance(desc, obj) -> str:
    """What an object the mission does not name shares with what it names: "colour" (the named colour, another
    type), "type" (the named type, another colour), "both" (named type and colour, elsewhere than the mission's
    location) or "neither"."""
    colour = desc.color is not None and obj.color == desc.color
    kind = desc.type is not None and obj.type == desc.type
    return {(True, True): "both", (True, False): "colour", (False, True): "type"}.get((colour, kind), "neither")


def wrong_kind(desc, obj) -> str:
    """What a picked-up object that ``desc`` does not name got wrong: its type, its colour, or (both right) its
    place relative to the agent's start."""
    if desc.type is not None and obj.type != desc.type:
        return "type"
    if desc.color is not None and obj.color != desc.color:
        return "colour"
    return "location"


def analyse(cfg, task: str, policy: PolicySpec, seeds: list[int]) -> list[dict]:
    """One row per seed: success and :func:`replay`'s fields."""
    # To the task's own step limit, as the evaluation measures (rollout.measure_returns).
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_episode_steps=None))
    worker = RolloutWorker(task, policy, cfg, min(len(seeds), cfg.rollout.envs_per_actor))
    try:
        result = worker.sample(seeds, source="policy")
    finally:
        worker.close()
    if result.failed:
        raise RuntimeError(f"{task}: {len(result.failed)} episode(s) lost to env errors: {result.failed}")
    env = envs.make_env(get_task(task), None)
    try:
        return [{"seed": e.seed, "success": bool(e.success), **replay(env, e.seed, e.actions)}
                for e in sorted(result.episodes, key=lambda e: e.seed)]
    finally:
        env.close()


def summary(rows: list[dict]) -> str:
    def rate(sel):
        return f"{sum(r['success'] for r in sel)}/{len(sel)}" if sel else "-"
    failed = [r for r in rows if not r["success"]]
    starts = Counter(r["first_pickup"] for r in failed)
    wrong = [r for r in rows if r["first_pickup"] == "wrong"]
    kinds = Counter(r["wrong_kind"] for r in wrong)
    stuck = [r for r in failed if r["blocked_object"] + r["blocked_wall"] >= STUCK]
    blockers = Counter(r["blocker_kind"] for r in stuck if r["blocker_kind"] is not None)
    others = Counter(k for r in rows for k in r["others"])
    n_others = max(sum(others.values()), 1)
    kinds_share = ", ".join(f"{k} {blockers[k]} ({others[k] / n_others:.0%})" for k in ("colour", "type", "both", "neither"))
    return (f"success {rate(rows)}; target in first view {rate([r for r in rows if r['in_view']])}, "
            f"not in view {rate([r for r in rows if not r['in_view']])}; location in the mission "
            f"{rate([r for r in rows if r['loc']])}, none {rate([r for r in rows if not r['loc']])}; "
            f"failures' first pickup: wrong {starts['wrong']}, none {starts['none']}, target {starts['target']}; "
            f"wrong pickups: of another type {kinds['type']}, colour {kinds['colour']}, location "
            f"{kinds['location']}, later dropped {sum(r['dropped'] for r in wrong)}/{len(wrong)}; failures stuck "
            f"pressing forward (>= {STUCK} blocked): {len(stuck)}/{len(failed)}, their blocked forwards against an "
            f"object {sum(r['blocked_object'] for r in stuck)}, a wall or door {sum(r['blocked_wall'] for r in stuck)}; the object a stuck failure pressed into most, against what it shares "
            f"with the mission's target (in brackets: the share of the levels' other objects): {kinds_share}")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", help="model.pt to act with (not with --expert)")
    ap.add_argument("--expert", action="store_true", help="act with each task's expert (the bot) instead")
    ap.add_argument("--tasks", nargs="*", help="BabyAI tasks of the config (default: all of them)")
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--seed-offset", type=int, default=None, help="first seed (default: eval.seed_offset)")
    args, overrides = ap.parse_known_args(argv)
    if args.expert == bool(args.checkpoint):
        sys.exit("give exactly one of --checkpoint and --expert")
    if args.episodes < 1:
        sys.exit(f"--episodes must be at least 1, got {args.episodes}")
    cfg = load_config(args.config, overrides)
    try:
        tasks = babyai_tasks(cfg, args.tasks, args.config)
    except ValueError as e:
        sys.exit(str(e))
    try:
        seeds = held_out_seeds(cfg, args.episodes, args.seed_offset)
    except ValueError as e:
        sys.exit(f"--episodes/--seed-offset: {e}")
    for task in tasks:
        temperature = cfg.task_temperature(task)
        policy = PolicySpec("expert") if args.expert else PolicySpec("model", args.checkpoint, temperature=temperature)
        rows = analyse(cfg, task, policy, seeds)
        print(f"{task} ({'expert' if args.expert else f'model, temperature {temperature}'}): {summary(rows)}")


if __name__ == "__main__":
    main(sys.argv[1:])
