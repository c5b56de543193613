"""Evaluation throughput, as ratios measured in one run (absolute numbers on shared machines are noisy).

    .venv/bin/python bench/evaluate.py [--task BabyAI-GoToRedBall-v0] [--episodes 96] [--repeats 2] [--model-scale 1]
                                       [--model-repeats 3]

1. Episodes/s of ``evaluate`` (random policy, the whole harness end to end: actor start-up, seeds, report)
   with 1 rollout actor and with 2, one CPU each; the ratio is the scaling (ideal 2.0 on 2 free cores).
2. Env steps/s of the MODEL policy (an untrained ``small`` GATO at a 1024-token context, KV-cached decoding)
   in one rollout worker with 16 envs stepped in lockstep (one batched forward per token for all 16)
   over the same worker with 1 env, i.e. one env at a time as JAT and NEKO evaluate. Goal: >= 8x.
   Both use one torch thread: one actor, one core; best of ``--model-repeats`` interleaved runs. Two tasks:
   CartPole (6 tokens per step) and BabyAI (83 tokens per step, about 40 after the mission's pads are packed
   out); on a CPU both are compute-bound."""

from __future__ import annotations

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import ray  # noqa: E402
import torch  # noqa: E402

from mugato_ray.config import config_from_dict  # noqa: E402
from mugato_ray.evaluate import evaluate  # noqa: E402
from mugato_ray.model import GatoModel, save_model  # noqa: E402
from mugato_ray.rollout import PolicySpec, RolloutWorker  # noqa: E402
from mugato_ray.tokenizer import make_vocab  # noqa: E402


def episodes_per_second(task: str, episodes: int, actors: int, run_dir: str) -> float:
    cfg = config_from_dict({
        "run_dir": run_dir,
        "rollout": {"num_actors": actors, "envs_per_actor": 4, "actor_cpus": 1},
        "eval": {"episodes": episodes, "bootstrap_samples": 100},
        "tasks": [{"name": task, "episodes": 1}],
    })
    t0 = time.perf_counter()
    report = evaluate(cfg, PolicySpec("random"), log=lambda _: None)
    seconds = time.perf_counter() - t0
    assert report["tasks"][task]["episodes"] == episodes
    return episodes / seconds


def model_steps_per_second(
    task: str, checkpoint: str, cfg, num_envs: int, episodes: int
) -> tuple[float, float, int]:
    """(env steps per wall second, per CPU second of this process, env steps) of one worker's episodes.

    Everything runs in this process on one torch thread, so CPU seconds count its work alone: on a machine
    shared with other jobs they vary far less than wall seconds, which include the time other processes ran.
    """
    worker = RolloutWorker(task, PolicySpec("model", checkpoint), cfg, num_envs=num_envs)
    worker.sample([cfg.eval.seed_offset + 10_000])  # warm-up: first-call allocations, lazy imports
    cpu = time.process_time()
    result = worker.sample([cfg.eval.seed_offset + i for i in range(episodes)], return_episodes=False)
    cpu = time.process_time() - cpu
    worker.close()
    return result.env_steps / result.seconds, result.env_steps / cpu, result.env_steps


MODEL_EPISODES = {"CartPole-v1": 64, "BabyAI-GoToRedBall-v0": 16}
"""Episodes of a 16-env model-policy run; the 1-env run gets a quarter. An untrained model drops CartPole's
pole within ~10 steps but never finishes a BabyAI mission (64 steps), so CartPole needs more episodes."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="BabyAI-GoToRedBall-v0", help="task of the actor-scaling runs")
    parser.add_argument("--episodes", type=int, default=96, help="episodes per actor-count run")
    parser.add_argument("--repeats", type=int, default=2,
                        help="interleaved actor-count runs (best is kept); 0 skips them")
    parser.add_argument("--model-repeats", type=int, default=3,
                        help="interleaved 16-env / 1-env model-policy runs (best is kept)")
    parser.add_argument("--model-tasks", default=",".join(MODEL_EPISODES),
                        help="tasks of the model-policy runs (6 and 83 tokens per step)")
    parser.add_argument("--model-scale", type=float, default=1.0, help="multiply the model-policy episodes")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--context", type=int, default=1024)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.repeats > 0:
            ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
            best = {1: 0.0, 2: 0.0}
            for r in range(args.repeats):
                for actors in best:
                    eps = episodes_per_second(args.task, args.episodes, actors, f"{tmp}/{actors}-{r}")
                    best[actors] = max(best[actors], eps)
            print(f"evaluate {args.task}, random policy, {args.episodes} episodes (end to end, best of "
                  f"{args.repeats}): 1 actor {best[1]:.2f} episodes/s, 2 actors {best[2]:.2f} episodes/s, "
                  f"ratio {best[2] / best[1]:.2f}")
            ray.shutdown()

        torch.set_num_threads(1)
        cfg = config_from_dict({"model": {"preset": args.preset, "context": args.context}})
        torch.manual_seed(0)
        model = GatoModel(cfg.model, make_vocab(cfg.tokenizer), patch_size=cfg.tokenizer.patch_size,
                          mu=cfg.tokenizer.mu, M=cfg.tokenizer.M)
        ckpt = str(save_model(model, Path(tmp) / "model.pt"))
        print(f"model: {args.preset} preset, {model.num_params() / 1e6:.1f}M parameters, context {args.context}")
        cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_episode_steps=None))
        for task in args.model_tasks.split(","):
            n = max(4, round(MODEL_EPISODES.get(task, 16) * args.model_scale))
            best = {16: [0.0, 0.0], 1: [0.0, 0.0]}  # envs -> best [wall, cpu] env steps/s
            steps = {}
            for _ in range(args.model_repeats):
                for envs, episodes in ((16, n), (1, max(1, n // 4))):
                    wall, cpu, steps[envs] = model_steps_per_second(task, ckpt, cfg, envs, episodes)
                    best[envs] = [max(best[envs][0], wall), max(best[envs][1], cpu)]
            (w16, c16), (w1, c1) = best[16], best[1]
            print(f"model policy on {task} (best of {args.model_repeats}): 16 envs/actor {w16:.1f} env steps/s "
                  f"({steps[16]} steps), 1 env at a time {w1:.1f} env steps/s ({steps[1]} steps), ratio {w16 / w1:.2f}; "
                  f"per CPU second {c16:.1f} / {c1:.1f}, ratio {c16 / c1:.2f}")


if __name__ == "__main__":
    main()
