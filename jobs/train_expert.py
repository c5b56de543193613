"""Train RLlib PPO experts (new API stack) for env tasks and save them under <run_dir>/experts/<task>/.

    python jobs/train_expert.py --config configs/expert_ppo.yaml --task CartPole-v1 [--iterations 20] [key=value ...]

Without --task, every env task of the config's ``tasks`` list is trained. A saved expert is used by
registering the task with ``expert="rllib:<run_dir>/experts/<task>"``. Under ``ray job submit`` the job joins
the cluster (RAY_ADDRESS); set --num-env-runners there to sample in parallel.
"""

from __future__ import annotations

import argparse
import sys

from mugato_ray import cli, experts, tasks
from mugato_ray.config import save_config
from mugato_ray.envs import make_env


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", action="append", default=[], help="task to train (repeatable)")
    parser.add_argument("--iterations", type=int, default=50, help="PPO training iterations")
    parser.add_argument("--target-return", type=float, default=None, help="stop once the sampled mean reaches it")
    parser.add_argument("--num-env-runners", type=int, default=0, help="remote RLlib env runners (0: sample locally)")
    parser.add_argument("--num-envs-per-env-runner", type=int, default=1)
    parser.add_argument("--train-batch-size", type=int, default=4000, help="env steps per iteration")
    parser.add_argument("--minibatch-size", type=int, default=128)
    parser.add_argument("--num-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-episodes", type=int, default=10, help="greedy episodes to score the saved expert")


def main(argv: list[str] | None = None) -> None:
    cfg, args = cli.parse_job_args(argv, __doc__.splitlines()[0], add_args, needs_tasks=False)
    names = args.task or [t.name for t in cfg.tasks if tasks.get_task(t.name).has_env]
    if not names:
        sys.exit("train_expert: no env task given (use --task NAME or list env tasks in the config)")
    cli.init_ray(cfg)
    save_config(cfg)
    for name in names:
        path = experts.train_ppo_expert(
            name,
            cfg,
            args.iterations,
            num_env_runners=args.num_env_runners,
            num_envs_per_env_runner=args.num_envs_per_env_runner,
            train_batch_size=args.train_batch_size,
            minibatch_size=args.minibatch_size,
            num_epochs=args.num_epochs,
            lr=args.lr,
            target_return=args.target_return,
        )
        envs = [make_env(name) for _ in range(min(args.eval_episodes, 8))]
        seeds = range(cfg.eval.seed_offset, cfg.eval.seed_offset + args.eval_episodes)
        stats = experts.episode_returns(name, experts.RLlibPolicy(path, len(envs)), envs, seeds)
        print(
            f"{name}: greedy mean return {stats.mean_return:.2f} over {args.eval_episodes} episodes; expert at {path}"
        )


if __name__ == "__main__":
    main()
