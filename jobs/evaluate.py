"""Evaluate a policy on every task of a config; write <run_dir>/eval/eval.json, eval.md and a PNG of the scores.

    python jobs/evaluate.py --config configs/smoke.yaml (--checkpoint PATH | --policy expert|random) [key=value ...]

PATH is a model file or a training checkpoint directory (holding model.pt). The model acts greedily unless
rollout.temperature > 0; eval.prompt=true prompts it with an expert demonstration.
"""

from __future__ import annotations

import sys

from mugato_ray.cli import init_ray, parse_job_args
from mugato_ray.evaluate import eval_dir, evaluate, summary_lines, write_report
from mugato_ray.rollout import PolicySpec


def add_args(parser) -> None:
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--checkpoint", help="model file or checkpoint directory to evaluate")
    who.add_argument("--policy", choices=("expert", "random"), help="evaluate a reference policy instead of a model")


def main(argv: list[str]) -> None:
    cfg, args = parse_job_args(argv, __doc__, add_args)
    if args.checkpoint:
        policy = PolicySpec("model", args.checkpoint, temperature=cfg.rollout.temperature)
    else:
        policy = PolicySpec(args.policy)
    init_ray(cfg)
    report = evaluate(cfg, policy)
    paths = write_report(report, eval_dir(cfg))
    for line in summary_lines(report):
        print(line)
    for path in paths.values():
        print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
