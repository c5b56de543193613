"""Collect episodes of every task in a config into <run_dir>/data/<task>/ with parallel rollout actors.

    python jobs/collect.py --config configs/smoke.yaml [key=value ...] [--policy random] [--resume]
"""

from __future__ import annotations

import sys

from mugato_ray.cli import init_ray, parse_job_args
from mugato_ray.collect import collect
from mugato_ray.config import save_config
from mugato_ray.rollout import POLICY_KINDS, PolicySpec


def add_args(parser) -> None:
    parser.add_argument("--policy", choices=POLICY_KINDS, default="expert", help="who acts (default: expert)")
    parser.add_argument("--checkpoint", help="model checkpoint, for --policy model")
    parser.add_argument("--source", help="the episodes' source column (default: expert, random or policy)")
    parser.add_argument("--resume", action="store_true", help="keep chunks already in the store, run the rest")


def main(argv: list[str]) -> None:
    cfg, args = parse_job_args(argv, __doc__, add_args, store="present")
    policy = PolicySpec(args.policy, args.checkpoint, temperature=cfg.rollout.temperature)
    source = args.source or {"model": "policy"}.get(args.policy, args.policy)
    init_ray(cfg)
    save_config(cfg)
    summaries = collect(cfg, policy, source, resume=args.resume)
    print(f"{'task':<28} {'kept':>6} {'filtered':>8} {'failed':>6} {'mean return':>11}  files")
    for name, s in summaries.items():
        mean = "n/a" if s.mean_return is None else f"{s.mean_return:.2f}"
        print(f"{name:<28} {s.kept:>6} {s.filtered:>8} {s.failed:>6} {mean:>11}  {len(s.files)}")


if __name__ == "__main__":
    main(sys.argv[1:])
