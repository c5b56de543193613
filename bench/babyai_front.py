"""Does a BabyAI policy see that an object blocks its way? P(forward) where ``forward`` cannot move the agent.

    python bench/babyai_front.py --config <run>/config.yaml --checkpoint <run>/snapshots/step_N/model.pt
        [--tasks BabyAI-GoToRedBall-v0 ...] [--episodes 200] [--seed-offset 3300000] [key=value ...]
    python bench/babyai_front.py --config <run>/config.yaml --baseline-steps 2500 [...]

The bot walks each seed's episode (``eval.seed_offset`` up, moved by ``--seed-offset``: held-out seeds), and
each state it acts in falls in one of three groups by what stands in front of the agent:

- **adjacent**: a key, ball or box in the cell in front. ``forward`` cannot enter it; the bot never presses it
  there (it turns, or picks the object up), so its probability of ``forward`` is 0;
- **two ahead**: the cell in front is empty and the one after it holds such an object (``forward`` moves);
- **other**: the rest.

Each state is given to the policy as the first step of a window, with no history. (Training windows of
``min(L, window)`` steps are placed uniformly in an episode, so in a short episode a state after the first
is seldom a window's first step; trained on windows that start at any step, a model put 0.53 on ``forward``
in front of an object instead of 0.69, still far from the bot's 0: bench/README.md, "BabyAI-GoToRedBall: nor
the cell's own token, the window's start or the learning rate".) The tool prints
per group: how many states, the bot's share of ``forward``, the policy's mean P(forward) and its mean
probability of the bot's action (over the level's legal actions, softmax at 1.0).

A policy that sees the object in front puts little on ``forward`` where it is adjacent and about the bot's
share where it is two cells away. One that cannot tell the two apart walks into objects and, its input then
unchanged, can press ``forward`` until the step limit: what ``bench/babyai_failures.py`` counts as stuck.
``--baseline-steps N`` measures the plain baseline (``mugato_ray.baseline``) trained N updates on the store.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from babyai_probe import OBJECTS, babyai_tasks, first_action_probs, probe_policy  # noqa: E402

from mugato_ray import envs  # noqa: E402
from mugato_ray.config import load_config  # noqa: E402
from mugato_ray.evaluate import held_out_seeds  # noqa: E402
from mugato_ray.tasks import get_task  # noqa: E402

FORWARD = 2
"""minigrid's ``Actions.forward``."""
GROUPS = ("adjacent", "two ahead", "other")


def front_group(env) -> str:
    """Which group the agent's present state is in (see the module doc)."""
    u = env.unwrapped
    front = u.grid.get(*u.front_pos)
    if front is not None:
        return "adjacent" if front.type in OBJECTS else "other"
    x, y = u.front_pos + u.dir_vec
    after = u.grid.get(x, y) if 0 <= x < u.width and 0 <= y < u.height else None
    return "two ahead" if after is not None and after.type in OBJECTS else "other"


def bot_states(env, seeds: Sequence[int], max_steps: int = 256) -> dict[str, list[tuple[dict, int]]]:
    """Every state the bot acts in on ``seeds``, as (observation, the bot's action), by :func:`front_group`."""
    from minigrid.utils.baby_ai_bot import BabyAIBot

    out: dict[str, list[tuple[dict, int]]] = {g: [] for g in GROUPS}
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        bot = BabyAIBot(env.unwrapped)
        for _ in range(max_steps):
            action = int(bot.replan())
            out[front_group(env)].append((obs, action))
            obs, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                break
    return out


def forward_probabilities(policy, states: Sequence[tuple[dict, int]], action_ids: Sequence[int]) -> dict:
    """Over ``states`` (an even number are used: the policy acts in 2 envs): how many, the bot's share of
    ``forward``, the policy's mean P(forward) and mean P(the bot's action), over the legal actions."""
    states = list(states[: len(states) // 2 * 2])
    if not states:
        return {"states": 0, "bot_forward": float("nan"), "p_forward": float("nan"), "p_bot_action": float("nan")}
    p = np.concatenate([first_action_probs(policy, [obs for obs, _ in states[k : k + 2]])
                        for k in range(0, len(states), 2)])
    legal = p[:, list(action_ids)]
    legal = legal / legal.sum(axis=1, keepdims=True)
    bot = np.array([a for _, a in states])
    return {"states": len(states), "bot_forward": float(np.mean(bot == FORWARD)),
            "p_forward": float(legal[:, FORWARD].mean()), "p_bot_action": float(legal[np.arange(len(bot)), bot].mean())}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", help="model.pt to act with")
    ap.add_argument("--baseline-steps", type=int, help="measure the plain baseline, trained this many updates")
    ap.add_argument("--tasks", nargs="*", help="BabyAI tasks of the config (default: all of them)")
    ap.add_argument("--episodes", type=int, default=200, help="bot episodes (seeds) to take states from")
    ap.add_argument("--seed-offset", type=int, default=None, help="first seed (default: eval.seed_offset)")
    args, overrides = ap.parse_known_args(argv)
    if (args.checkpoint is None) == (args.baseline_steps is None):
        sys.exit("give exactly one of --checkpoint and --baseline-steps")
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
        env = envs.make_env(get_task(task), None)
        try:
            policy, action_ids = probe_policy(cfg, task, env, args.checkpoint, args.baseline_steps)
            groups = bot_states(env, seeds)
            for g in GROUPS:
                r = forward_probabilities(policy, groups[g], action_ids)
                print(f"{task}, {g}: {r['states']} bot states, bot forward {r['bot_forward']:.2f}, policy "
                      f"P(forward) {r['p_forward']:.3f}, P(bot's action) {r['p_bot_action']:.3f}")
        finally:
            env.close()


if __name__ == "__main__":
    main(sys.argv[1:])
