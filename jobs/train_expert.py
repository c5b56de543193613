"""Train RLlib PPO experts (new API stack) for env tasks and save them under <run_dir>/experts/<task>/.

    python jobs/train_expert.py --config configs/expert_ppo.yaml --task CartPole-v1 [ppo.iterations=20] [key=value ...]

PPO's knobs are the config's ``ppo`` section (mugato_ray.config.PPOConfig), overridden like any other key
(``ppo.iterations=20 ppo.train_batch_size=2000``). Without --task, every env task of the config's ``tasks``
list is trained. A saved expert is used by registering the task with ``expert="rllib:<run_dir>/experts/<task>"``.
Under ``ray job submit`` the job joins the cluster (RAY_ADDRESS); set ``ppo.num_env_runners`` there to sample
in parallel.
"""

from __future__ import annotations

import argparse
import sys

from mugato_ray import cli, experts, ppo, tasks
from mugato_ray.config import save_config
from mugato_ray.rollout import measure_returns


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", action="append", default=[], help="task to train (repeatable)")


def main(argv: list[str] | None = None) -> None:
    cfg, args = cli.parse_job_args(argv, __doc__.splitlines()[0], add_args, needs_tasks=False)
    names = args.task or [t.name for t in cfg.tasks if tasks.get_task(t.name).has_env]
    if not names:
        sys.exit("train_expert: no env task given (use --task NAME or list env tasks in the config)")
    cli.init_ray(cfg)
    save_config(cfg)
    episodes = cfg.ppo.eval_episodes
    for name in names:
        path = ppo.train_ppo_expert(name, cfg.ppo, ppo.expert_dir(cfg, name))
        num_envs = min(episodes, 8)
        seeds = range(cfg.eval.seed_offset, cfg.eval.seed_offset + episodes)
        stats = measure_returns(name, experts.RLlibPolicy(path, num_envs), cfg, seeds, num_envs=num_envs)
        print(f"{name}: greedy mean return {stats.mean_return:.2f} over {episodes} episodes; expert at {path}")


if __name__ == "__main__":
    main()
