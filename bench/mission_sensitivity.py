"""Does a policy read its mission? How much its first action moves with the mission, against the frame.

    python bench/mission_sensitivity.py --config <run>/config.yaml --checkpoint <run>/snapshots/step_N/model.pt
        [--tasks BabyAI-PickupLoc-v0 ...] [--frames 200] [--seed-offset 3200000] [key=value ...]
    python bench/mission_sensitivity.py --config <run>/config.yaml --baseline-steps 2500 [...]

``--baseline-steps N`` measures the plain behaviour-cloning baseline (``mugato_ray.baseline``: a small CNN,
a bag of mission words and an MLP) trained for N updates on the task's store instead of a model.

For each of ``--frames`` first frames (one env reset per seed, ``eval.seed_offset`` up, moved by
``--seed-offset``), the model's action distribution at the first step (its raw logits, softmax at 1.0) is
compared by total variation distance (0: the same distribution, 1: disjoint):

- **mission swapped**: the same frame and direction with another seed's (different) mission;
- **frame swapped**: the same mission with another seed's frame and direction.

On levels whose bot picks something up (PickupLoc), also the decision that the level turns on: the frames
where the bot picks its target up (it faces it), each as the first step of a window (training windows
start anywhere in an episode too), and the policy's probability of `pickup` there with the true mission
against with another seed's mission that names another type of object. A policy that reads its mission
picks up under the first and not under the second.

A policy that grounds its mission moves with both; one that acts on the scene alone (walk to the nearest
object and pick it up) moves with the frame only. Also printed: how often the greedy action stays the same
under each swap. GoToRedBall's two phrasings ("go to the red ball", "go to a red ball") mean the same:
its mission swap measures how much a change of wording alone moves the policy. A level with one mission on
every seed is skipped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from babyai_probe import TEXT_KEY, babyai_tasks, first_action_probs, probe_policy  # noqa: E402

from mugato_ray import envs  # noqa: E402
from mugato_ray.config import load_config  # noqa: E402
from mugato_ray.evaluate import held_out_seeds  # noqa: E402
from mugato_ray.tasks import get_task  # noqa: E402


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


PICKUP = 3
"""minigrid's ``Actions.pickup``."""


def pickup_frames(env, seeds: Sequence[int], max_steps: int = 256) -> list[tuple[dict, str]]:
    """For each seed whose bot picks something up: the observation it picks up from, and the mission's object
    type. Replanned from the env's own state, as the bot collects."""
    from minigrid.utils.baby_ai_bot import BabyAIBot

    out = []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        bot = BabyAIBot(env.unwrapped)
        for _ in range(max_steps):
            action = int(bot.replan())
            if action == PICKUP:
                out.append((obs, env.unwrapped.instrs.desc.type))
                break
            obs, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                break
    return out


def pickup_probability(policy, observations: Sequence[dict], action_ids: Sequence[int]) -> np.ndarray:
    """P(pickup) of the policy's first action, over its legal action ids only, for each observation (an even
    number of them: the policy acts in 2 envs)."""
    if len(observations) % 2:
        raise ValueError(f"pickup_probability: {len(observations)} observations, expected an even number")
    p = np.concatenate([first_action_probs(policy, list(observations[k : k + 2]))
                        for k in range(0, len(observations), 2)])
    legal = p[:, list(action_ids)]
    return legal[:, PICKUP] / legal.sum(axis=1)


def pickup_discrimination(policy, frames: Sequence[tuple[dict, str]], action_ids: Sequence[int],
                          seed: int = 0) -> dict:
    """Mean P(pickup) facing the target under its own mission and under a mission naming another type."""
    rng = np.random.default_rng(seed)
    frames = list(frames[: len(frames) // 2 * 2])
    own = [obs for obs, _ in frames]
    swapped = []
    for obs, kind in frames:
        others = [o[TEXT_KEY] for o, k in frames if k != kind]
        if not others:
            raise ValueError("every mission names the same type of object: nothing to swap")
        swapped.append({**obs, TEXT_KEY: str(rng.choice(others))})
    return {"pickup_frames": len(frames), "p_pickup_own": float(pickup_probability(policy, own, action_ids).mean()),
            "p_pickup_other": float(pickup_probability(policy, swapped, action_ids).mean())}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", help="model.pt to act with")
    ap.add_argument("--baseline-steps", type=int, help="measure the plain baseline, trained this many updates")
    ap.add_argument("--tasks", nargs="*", help="BabyAI tasks of the config (default: all of them)")
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--seed-offset", type=int, default=None, help="first seed (default: eval.seed_offset)")
    args, overrides = ap.parse_known_args(argv)
    if (args.checkpoint is None) == (args.baseline_steps is None):
        sys.exit("give exactly one of --checkpoint and --baseline-steps")
    if args.frames < 2:
        sys.exit(f"--frames must be at least 2, got {args.frames}")
    cfg = load_config(args.config, overrides)
    try:
        tasks = babyai_tasks(cfg, args.tasks, args.config)
    except ValueError as e:
        sys.exit(str(e))
    try:
        seeds = held_out_seeds(cfg, args.frames, args.seed_offset)
    except ValueError as e:
        sys.exit(f"--frames/--seed-offset: {e}")
    for task in tasks:
        env = envs.make_env(get_task(task), None)
        try:
            frames = [env.reset(seed=s)[0] for s in seeds]
            if len({f[TEXT_KEY] for f in frames}) < 2:
                print(f"{task}: one mission on every seed, skipped")
                continue
            policy, action_ids = probe_policy(cfg, task, env, args.checkpoint, args.baseline_steps)
            r = sensitivity(policy, frames)
            picks = pickup_frames(env, seeds)
            if len(picks) >= 2:
                r |= pickup_discrimination(policy, picks, action_ids)
        finally:
            env.close()
        print(f"{task}: first-action total variation, mission swapped {r['tv_mission']:.3f}, frame swapped "
              f"{r['tv_frame']:.3f}; same greedy action {r['same_greedy_mission']:.2f} and "
              f"{r['same_greedy_frame']:.2f}, over {r['frames']} first frames")
        if "pickup_frames" in r:
            print(f"{task}: P(pickup) facing the target, own mission {r['p_pickup_own']:.3f}, a mission naming "
                  f"another type {r['p_pickup_other']:.3f}, over {r['pickup_frames']} of the bot's pickup frames")


if __name__ == "__main__":
    main(sys.argv[1:])
