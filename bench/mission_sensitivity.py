"""Does a policy read its mission? How much its first action moves with the mission, against the frame.

    python bench/mission_sensitivity.py --config <run>/config.yaml --checkpoint <run>/snapshots/step_N/model.pt
        [--tasks BabyAI-PickupLoc-v0 ...] [--frames 200] [--seed-offset 3200000] [key=value ...]

For each of ``--frames`` first frames (one env reset per seed, ``eval.seed_offset`` up, moved by
``--seed-offset``), the model's action distribution at the first step (its raw logits, softmax at 1.0) is
compared by total variation distance (0: the same distribution, 1: disjoint):

- **mission swapped**: the same frame and direction with another seed's (different) mission;
- **frame swapped**: the same mission with another seed's frame and direction.

A policy that grounds its mission moves with both; one that acts on the scene alone (walk to the nearest
object and pick it up) moves with the frame only. Also printed: how often the greedy action stays the same
under each swap. GoToRedBall's two phrasings ("go to the red ball", "go to a red ball") mean the same:
its mission swap measures how much a change of wording alone moves the policy. A level with one mission on
every seed is skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import numpy as np

from mugato_ray import envs
from mugato_ray.config import load_config
from mugato_ray.evaluate import check_seeds_disjoint, eval_seeds
from mugato_ray.resolve import resolve_task
from mugato_ray.rollout import PolicySpec, make_policy
from mugato_ray.tasks import get_task

TEXT_KEY = "mission"


def first_action_probs(policy, observations: Sequence[dict]) -> np.ndarray:
    """(len(observations), V) first-token action probabilities of ``policy`` (built for as many envs), each
    observation the first step of a fresh episode."""
    n = len(observations)
    policy.reset(list(range(n)), list(range(n)))
    batch = {k: [o[k] for o in observations] if k == TEXT_KEY else np.stack([np.asarray(o[k]) for o in observations])
             for k in observations[0]}
    _, _, logits = policy.act_with_logits(batch)
    z = np.asarray(logits[:, 0], dtype=np.float64)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def partners(missions: Sequence[str], rng: np.random.Generator) -> list[int]:
    """For each frame, another frame whose mission differs (so a swap changes the mission)."""
    out = []
    for m in missions:
        others = [j for j, mj in enumerate(missions) if mj != m]
        if not others:
            raise ValueError("every frame has the same mission: nothing to swap")
        out.append(int(rng.choice(others)))
    return out


def sensitivity(policy, frames: Sequence[dict], seed: int = 0) -> dict:
    """Mean total variation and greedy agreement of the first action under a mission swap and a frame swap.

    ``policy``: acts in 2 envs (``reset``, ``act_with_logits``); ``frames``: first observations of episodes.
    """
    rng = np.random.default_rng(seed)
    j_of = partners([f[TEXT_KEY] for f in frames], rng)
    tv = {"mission": [], "frame": []}
    same = {"mission": [], "frame": []}
    for i, j in enumerate(j_of):
        own = frames[i]
        swaps = {"mission": {**own, TEXT_KEY: frames[j][TEXT_KEY]}, "frame": {**frames[j], TEXT_KEY: own[TEXT_KEY]}}
        for name, other in swaps.items():
            p, q = first_action_probs(policy, [own, other])
            tv[name].append(0.5 * float(np.abs(p - q).sum()))
            same[name].append(bool(p.argmax() == q.argmax()))
    return {"frames": len(frames), **{f"tv_{k}": float(np.mean(v)) for k, v in tv.items()},
            **{f"same_greedy_{k}": float(np.mean(v)) for k, v in same.items()}}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", required=True, help="model.pt to act with")
    ap.add_argument("--tasks", nargs="*", help="BabyAI tasks of the config (default: all of them)")
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--seed-offset", type=int, default=None, help="first seed (default: eval.seed_offset)")
    args, overrides = ap.parse_known_args(argv)
    if args.frames < 2:
        sys.exit(f"--frames must be at least 2, got {args.frames}")
    cfg = load_config(args.config, overrides)
    babyai = [t.name for t in cfg.tasks if get_task(t.name).domain == "babyai"]
    tasks = args.tasks or babyai
    if unknown := sorted(set(tasks) - set(babyai)):
        sys.exit(f"--tasks: {unknown} are not BabyAI tasks of {args.config}")
    offset = cfg.eval.seed_offset if args.seed_offset is None else args.seed_offset
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, episodes=args.frames, seed_offset=offset))
    try:
        check_seeds_disjoint(cfg)
    except ValueError as e:
        sys.exit(f"--frames/--seed-offset: {e}")
    for task in tasks:
        env = envs.make_env(get_task(task), None)
        try:
            frames = [env.reset(seed=s)[0] for s in eval_seeds(cfg)]
            if len({f[TEXT_KEY] for f in frames}) < 2:
                print(f"{task}: one mission on every seed, skipped")
                continue
            policy = make_policy(PolicySpec("model", args.checkpoint), resolve_task(task, cfg), [env, env], cfg)
            r = sensitivity(policy, frames)
        finally:
            env.close()
        print(f"{task}: first-action total variation, mission swapped {r['tv_mission']:.3f}, frame swapped "
              f"{r['tv_frame']:.3f}; same greedy action {r['same_greedy_mission']:.2f} and "
              f"{r['same_greedy_frame']:.2f}, over {r['frames']} first frames")


if __name__ == "__main__":
    main(sys.argv[1:])
